"""The source header, made fit to copy: what the results carry over, each value valid for its VR.

The SR and the Secondary Capture copy the source's Patient and Study attributes, which is what
lets an archive file them with the study. Research exports are de-identified, and de-identifiers
leave values a validator refuses and highdicom cannot take: no PatientBirthDate at all (a Type 2
attribute), a hash string in it (not a DA), PatientAge "62" (AS needs a unit: "062Y"), a sex
written "male", names with control characters. :func:`clean_source` builds a new dataset holding
only the attributes the results need, each checked against its VR and value multiplicity:

* a value that can be read one way only is corrected ("62" -> "062Y", "2019.03.01" ->
  "20190301", "12:30:00" -> "123000", "m" -> "M", control characters removed);
* any other invalid value is dropped -- a Type 2 attribute stays, empty, as the IODs require;
* a Type 1 reference (the source's UIDs) that is missing or invalid raises :class:`SourceError`
  naming it, since the results could not point at their image.

Each correction or drop is counted by kind (``"PatientAge: AS without unit, read as years"``);
the kinds name the attribute and the rule, never a value.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from typing import Any

from agcnn.data.scope import CHEST_BODY_PARTS
from agcnn.dicom_out import SourceError

__all__ = ["REFERENCES", "COPIED", "clean_source", "laterality"]


# Type 1: the results reference the source instance by these.
REFERENCES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# keyword -> type in the results (PS3.3 Patient, General Study, Patient Study, General Series).
# "2": present, empty when the source has no valid value; "3": copied only when valid.
COPIED = {
    "PatientName": "2", "PatientID": "2", "PatientBirthDate": "2", "PatientSex": "2",
    "IssuerOfPatientID": "3", "PatientBirthTime": "3",
    "PatientIdentityRemoved": "3", "DeidentificationMethod": "3", "DeidentificationMethodCodeSequence": "3",
    "StudyDate": "2", "StudyTime": "2", "AccessionNumber": "2", "ReferringPhysicianName": "2", "StudyID": "2",
    "StudyDescription": "3",
    "PatientAge": "3", "PatientSize": "3", "PatientWeight": "3",
    # For the Secondary Capture's General Series: they decide whether Laterality is needed.
    "BodyPartExamined": "3", "Laterality": "3", "ImageLaterality": "3",
    "PatientOrientation": "3",
    # What the SR's references check the source by (an image, and of which modality).
    "Modality": "3", "Rows": "3", "Columns": "3", "SamplesPerPixel": "3", "PixelRepresentation": "3",
    "NumberOfFrames": "3",
}
# PS3.5 6.2: no control characters in these VRs but ESC (ISO 2022 escapes); the text VRs also
# allow CR, LF, TAB and FF.
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI", "UR", *_TEXT_VRS})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_CONTROL_STRICT = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def clean_source(ds: Any, fixes: Counter | None = None):
    """A new pydicom Dataset with the source's references and :data:`COPIED` attributes, valid.

    ``fixes`` (if given) counts each correction or drop by kind. Raises :class:`SourceError`
    when a reference in :data:`REFERENCES` is missing or not a valid UID.
    """
    from pydicom.dataset import Dataset

    fixes = Counter() if fixes is None else fixes
    out = Dataset()
    for keyword in REFERENCES:
        value, problem = _read(ds, keyword)
        if value in (None, "") or problem is not None:
            why = "has no" if value in (None, "") and problem is None else "has an invalid"
            raise SourceError(f"the source {why} {keyword}, which the results must reference", keyword)
        setattr(out, keyword, value)
    for keyword, kind in COPIED.items():
        value, problem = _read(ds, keyword)
        if problem is not None:
            fixes[f"{keyword}: {problem}"] += 1
        if value is not None:
            setattr(out, keyword, value)
        elif kind == "2":
            setattr(out, keyword, None)  # Type 2: present, zero length
    _deidentification_pair(out, fixes)
    _character_set(out, _declared_character_set(ds), fixes)
    return out


def laterality(ds: Any) -> str | None:
    """Laterality for a General Series (Type 2C) made from ``ds`` (a cleaned source).

    "R" / "L" from the source's Laterality, else its Image Laterality; absent (None) for the
    chest, an unpaired body part, as PS3.3 C.7.3.1 asks; otherwise present and empty ("")
    -- unknown: the body part is not named, or is a paired one with no side recorded.
    """
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(ds.get(keyword) or "")
        if value in ("R", "L"):
            return value
    body = str(ds.get("BodyPartExamined") or "")
    # LUNG is a paired structure; the other chest terms name the whole chest or a midline organ.
    return None if body in CHEST_BODY_PARTS - {"LUNG"} else ""


# ---------------------------------------------------------------------------- one attribute

def _read(ds: Any, keyword: str) -> tuple[Any, str | None]:
    """(the value to copy or None, what was wrong with the source's value or None)."""
    import warnings

    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.multival import MultiValue

    tag = tag_for_keyword(keyword)
    if tag not in ds:
        return None, None
    try:
        with warnings.catch_warnings():
            # Conversion warnings quote the value; the problem is reported below, by kind.
            warnings.simplefilter("ignore")
            elem = ds[tag]
            value = elem.value
    except Exception:  # noqa: BLE001 - a value pydicom cannot even convert
        return None, "unreadable value, dropped"
    vr = elem.VR if elem.VR not in ("UN", None) else dictionary_VR(tag)
    if vr == "SQ":
        return (value, None) if _sequence_valid(value) else (None, "invalid value inside the sequence, dropped")
    if value is None or value == "" or (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0):
        return None, None
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return _check_values(keyword, vr, tag, values)


def _check_values(keyword: str, vr: str, tag: int, values: list) -> tuple[Any, str | None]:
    from pydicom.datadict import dictionary_VM

    if not _vm_ok(dictionary_VM(tag), len(values)):
        return None, f"{len(values)} values where {dictionary_VM(tag)} allowed, dropped"
    fixed, notes = [], []
    for v in values:
        v2, note = _check_one(keyword, vr, v)
        if v2 is None:
            return None, note
        fixed.append(v2)
        if note:
            notes.append(note)
    value = fixed[0] if len(fixed) == 1 else fixed
    return value, (notes[0] if notes else None)


def _check_one(keyword: str, vr: str, value: Any) -> tuple[Any, str | None]:
    """(valid value or None, note): corrected when one reading is possible, else dropped."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    if vr not in _STRING_VRS:
        return value, None
    text, note = str(value), None
    pattern = _CONTROL if vr in _TEXT_VRS else _CONTROL_STRICT
    if pattern.search(text):
        text, note = pattern.sub("", text), "control characters removed"
    corrected, why = _correct(keyword, vr, text)
    if corrected is None:
        return None, why
    if corrected != text:
        text, note = corrected, why
    if vr == "PN" and not _person_name_ok(text):
        return None, f"{vr} with more than 5 components or 3 groups, dropped"
    try:
        validate_value(vr, text, config.RAISE)
    except (ValueError, TypeError):
        return None, f"not a valid {vr}, dropped"
    return text, note


def _correct(keyword: str, vr: str, text: str) -> tuple[str | None, str | None]:
    """Readings that leave one meaning; (None, why) for a value that is invalid beyond repair."""
    s = text.strip()
    if vr == "AS":
        m = re.fullmatch(r"(\d{1,3})\s*([DWMYdwmy]?)", s)
        if not m:
            return None, "not a valid AS, dropped"
        fixed = f"{int(m.group(1)):03d}{(m.group(2) or 'Y').upper()}"
        if fixed == text:
            return fixed, None
        return fixed, "AS reformatted" if m.group(2) else "AS without unit, read as years"
    if vr == "DA":
        for fmt in ("%Y%m%d", "%Y.%m.%d", "%Y-%m-%d"):
            try:
                day = datetime.datetime.strptime(s, fmt).date()
            except ValueError:
                continue
            fixed = day.strftime("%Y%m%d")
            return fixed, (None if fixed == text else "date written as YYYYMMDD")
        return None, "not a valid DA, dropped"
    if vr == "TM" and re.fullmatch(r"\d\d:\d\d(:\d\d(\.\d{1,6})?)?", s):
        return s.replace(":", ""), "time written as HHMMSS"
    if keyword == "PatientSex":
        sex = _SEX.get(s.upper())
        return (sex, None if sex == text else "sex written as M / F / O") if sex else (None, "not M, F or O, dropped")
    if vr == "CS" and s.upper() != s:
        return s.upper(), "CS written in upper case"
    return text, None


def _person_name_ok(text: str) -> bool:
    groups = text.split("=")
    return len(groups) <= 3 and all(len(g.split("^")) <= 5 and len(g) <= 64 for g in groups)


def _vm_ok(vm: str, n: int) -> bool:
    if "-" not in vm:
        return vm.isdigit() and n == int(vm)
    low, high = vm.split("-", 1)
    return n >= int(low) and (high.endswith("n") or n <= int(high))


def _sequence_valid(items: Any) -> bool:
    """Every element of every item is valid for its VR (no corrections inside sequences)."""
    from pydicom.datadict import keyword_for_tag

    for item in items:
        for elem in item:
            keyword = keyword_for_tag(elem.tag) or ""
            value, problem = _read(item, keyword) if keyword else (None, "private")
            if problem is not None:
                return False
    return True


# ---------------------------------------------------------------------------- across attributes

def _declared_character_set(ds: Any) -> Any:
    try:
        value = ds.get("SpecificCharacterSet")
    except Exception:  # noqa: BLE001 - unreadable: as if none were declared
        return None
    return value or None


def _deidentification_pair(out: Any, fixes: Counter) -> None:
    # Patient Identity Removed YES requires a De-identification Method (or its code sequence,
    # Type 1C); without one, the claim cannot be carried over.
    removed = out.get("PatientIdentityRemoved")
    if removed is not None and removed not in ("YES", "NO"):
        del out.PatientIdentityRemoved
        fixes["PatientIdentityRemoved: not YES or NO, dropped"] += 1
    elif removed == "YES" and not (out.get("DeidentificationMethod") or out.get("DeidentificationMethodCodeSequence")):
        del out.PatientIdentityRemoved
        fixes["PatientIdentityRemoved: YES without a De-identification Method, dropped"] += 1


def _character_set(out: Any, declared: Any, fixes: Counter) -> None:
    # Values were decoded to text with the source's character set; written back they need one
    # that holds them: the source's own when it is valid and does, UTF-8 (which holds every
    # value) otherwise; pure ASCII needs none (the default repertoire).
    texts = list(_texts(out))
    if all(t.isascii() for t in texts):
        return
    if declared and _encodes(texts, declared):
        out.SpecificCharacterSet = declared
        return
    out.SpecificCharacterSet = "ISO_IR 192"
    fixes["SpecificCharacterSet: text beyond ASCII re-encoded as UTF-8"] += 1


def _texts(ds: Any):
    from pydicom.multival import MultiValue

    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
        elif elem.VR in _STRING_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
            yield from (str(v) for v in values)


def _encodes(texts: list[str], declared: Any) -> bool:
    """Whether the declared Specific Character Set is one pydicom knows and holds every text."""
    import warnings

    from pydicom.charset import convert_encodings, encode_string

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown term only warns in pydicom
            encodings = convert_encodings(list(declared) if not isinstance(declared, str) else [declared])
            for text in texts:
                encode_string(text, encodings)
    except Exception:  # noqa: BLE001 - unknown term, or a character the set does not hold
        return False
    return True
