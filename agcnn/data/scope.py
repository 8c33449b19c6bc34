"""What agcnn predicts on: frontal chest radiographs, decided from the DICOM header.

The 14 ChestX-ray14 findings mean something only on a chest film seen from the front (the NIH
set holds PA and AP views only). A research PACS export also holds hips, hands and lateral
chest views; their probabilities would be numbers without meaning. :func:`decide` reads the
header attributes that say what an image shows and returns one of

* in scope: predicted, perhaps with notes (AP supine; attributes missing, so not checked);
* ``out_of_scope``: Body Part Examined (0018,0015) -- or, when it is absent, the first item
  of the Anatomic Region Sequence (0008,2218) -- names another body part;
* ``not_frontal``: View Position (0018,5101) -- or, when it is absent, the first item of the
  View Code Sequence (0054,0220) -- is a lateral, oblique or decubitus view.

A missing or empty attribute is not a reason to skip (PNG files and many secondary captures
carry none): the image is predicted with a note that its scope could not be checked. An
unknown *view* value is treated the same way (it may be a vendor's spelling of AP); an
unknown *body part* is out of scope, because the accepted list below is the whole chest.
``any_body_part`` / ``any_view`` switch either check off.

All accepted and rejected values live in the tables below, with their sources:

* Body Part Examined defined terms: PS3.16 Annex L (Correspondence of Anatomic Region Codes
  and Body Part Examined Defined Terms, CID 4031 Common Anatomic Regions);
* View Position defined terms: PS3.3 C.8.11.5 (DX Positioning) / C.8.1.1 (CR Image);
* View Code Sequence: CID 4010 DX View, SNOMED CT (``SCT``); the legacy SNOMED-RT (``SRT``)
  codes of older files are recognised by their code meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCOPE_REASONS",
    "OVERRIDES",
    "CHEST_BODY_PARTS",
    "CHEST_REGION_CODES",
    "FRONTAL_VIEW_POSITIONS",
    "NOT_FRONTAL_VIEW_POSITIONS",
    "FRONTAL_VIEW_CODES",
    "NOT_FRONTAL_VIEW_CODES",
    "SUPINE_CODES",
    "ScopePolicy",
    "Decision",
    "decide",
]

SCOPE_REASONS = ("out_of_scope", "not_frontal")
# The ScopePolicy field that switches each check off (``--any-body-part`` in predict,
# ``data.any_body_part`` for training): callers name it in their messages.
OVERRIDES = {"out_of_scope": "any_body_part", "not_frontal": "any_view"}

# ---- body part -------------------------------------------------------------------------
# Body Part Examined values that are (or contain) the chest. CHEST, CHESTABDOMEN, NECKCHEST,
# LUNG, HEART, MEDIASTINUM are PS3.16 Annex L defined terms; THORAX and TORAX are not, but
# vendors write them (German / Spanish consoles) and they say the same.
CHEST_BODY_PARTS: frozenset[str] = frozenset(
    {"CHEST", "CHESTABDOMEN", "NECKCHEST", "LUNG", "HEART", "MEDIASTINUM", "THORAX", "TORAX"}
)
# Anatomic Region Sequence codes for the same regions: (coding scheme, code value) -> meaning.
# SCT 816094009 is the current code for Chest (CID 4031); 51185008 (Thorax) is the older one.
CHEST_REGION_CODES: dict[tuple[str, str], str] = {
    ("SCT", "816094009"): "Chest",
    ("SCT", "51185008"): "Thorax",
    ("SCT", "416550000"): "Chest and Abdomen",
    ("SCT", "417437006"): "Neck and Chest",
    ("SCT", "39607008"): "Lung",
    ("SCT", "80891009"): "Heart",
    ("SCT", "72410000"): "Mediastinum",
    ("SRT", "T-D3000"): "Chest",
}
# Code meanings accepted for codes not in the table (legacy or local coding schemes).
_CHEST_MEANINGS = ("chest", "thorax", "lung", "heart", "mediastinum")

# ---- view ------------------------------------------------------------------------------
# View Position defined terms (PS3.3 C.8.11.5.1.1): AP, PA frontal; LL, RL lateral; RLD, LLD
# lateral decubitus (horizontal beam, patient on the side: none in ChestX-ray14); RLO, LLO
# oblique. LATERAL / LAT are common non-standard spellings.
FRONTAL_VIEW_POSITIONS: frozenset[str] = frozenset({"AP", "PA"})
NOT_FRONTAL_VIEW_POSITIONS: dict[str, str] = {
    "LL": "left lateral",
    "RL": "right lateral",
    "LATERAL": "lateral",
    "LAT": "lateral",
    "RLD": "right lateral decubitus",
    "LLD": "left lateral decubitus",
    "RLO": "right lateral oblique",
    "LLO": "left lateral oblique",
}
# Words that mark a free-text View Position (e.g. "LEFT LATERAL") as not frontal.
_NOT_FRONTAL_WORDS = frozenset({"LATERAL", "LAT", "OBLIQUE", "DECUBITUS", "DECUB"})
# View Code Sequence (CID 4010 DX View, SNOMED CT).
FRONTAL_VIEW_CODES: dict[tuple[str, str], str] = {
    ("SCT", "399348003"): "antero-posterior",
    ("SCT", "272479007"): "postero-anterior",
    ("SCT", "399033003"): "frontal",
}
NOT_FRONTAL_VIEW_CODES: dict[tuple[str, str], str] = {
    ("SCT", "399067008"): "lateral",
    ("SCT", "399173006"): "left lateral",
    ("SCT", "399198007"): "right lateral",
    ("SCT", "399352003"): "lateral-medial",
    ("SCT", "399260004"): "medial-lateral",
    ("SCT", "399182000"): "oblique",
    ("SCT", "260427002"): "lateral oblique",
    ("SCT", "399038007"): "right posterior oblique",
    ("SCT", "399006002"): "left posterior oblique",
    ("SCT", "399356000"): "right anterior oblique",
    ("SCT", "399135007"): "left anterior oblique",
    ("SCT", "399312000"): "antero-posterior oblique",
    ("SCT", "399059000"): "postero-anterior oblique",
    ("SCT", "399236003"): "right oblique",
    ("SCT", "399184004"): "left oblique",
    ("SCT", "399160007"): "frontal oblique",
}
# Supine: Patient Orientation Modifier Code Sequence (0054,0412), CID 20.
SUPINE_CODES: dict[tuple[str, str], str] = {("SCT", "40199007"): "supine", ("SRT", "F-10340"): "supine"}


@dataclass(frozen=True)
class ScopePolicy:
    """Which checks are switched off (``--any-body-part`` / ``--any-view``)."""

    any_body_part: bool = False
    any_view: bool = False


@dataclass
class Decision:
    """``reason`` is None (predict) or one of :data:`SCOPE_REASONS`; ``message`` says why."""

    reason: str | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)


def decide(ds: Any, policy: ScopePolicy = ScopePolicy()) -> Decision:
    """The scope decision for one DICOM header (a pydicom Dataset, pixels not needed)."""
    out = Decision()
    if not policy.any_body_part:
        reason = _check_body_part(ds, out.notes)
        if reason:
            out.reason, out.message = "out_of_scope", reason
            return out
    if not policy.any_view:
        reason = _check_view(ds, out.notes)
        if reason:
            out.reason, out.message = "not_frontal", reason
    return out


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value counts as absent
        return ""
    return " ".join(str(value or "").split()).upper()


def _first_code(ds: Any, keyword: str) -> tuple[str, str, str] | None:
    """(scheme, value, meaning) of the first item of a code sequence, or None."""
    try:
        seq = ds.get(keyword)
        if not seq:
            return None
        item = seq[0]
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed sequence counts as absent
        return None
    if not (value or meaning):
        return None
    return scheme, value, meaning


def _code_text(code: tuple[str, str, str]) -> str:
    scheme, value, meaning = code
    return f"({value}, {scheme}, {meaning!r})"


def _check_body_part(ds: Any, notes: list[str]) -> str | None:
    part = _text(ds, "BodyPartExamined")
    if part:
        if part in CHEST_BODY_PARTS:
            return None
        return f"BodyPartExamined is {part!r}, not the chest; accepted: {', '.join(sorted(CHEST_BODY_PARTS))}"
    code = _first_code(ds, "AnatomicRegionSequence")
    if code is None:
        notes.append("body part not checked: no BodyPartExamined or Anatomic Region Sequence")
        return None
    scheme, value, meaning = code
    if (scheme, value) in CHEST_REGION_CODES:
        return None
    if any(w in meaning.lower() for w in _CHEST_MEANINGS):
        return None  # a legacy or local code whose meaning names the chest
    return f"Anatomic Region Sequence is {_code_text(code)}, not the chest"


def _check_view(ds: Any, notes: list[str]) -> str | None:
    view = _text(ds, "ViewPosition")
    code = _first_code(ds, "ViewCodeSequence")
    supine = _supine(ds, view)
    frontal_note = (
        "AP supine: frontal, predicted; a supine bedside film looks unlike the erect PA films that "
        "make up most of the training data"
    )
    if view:
        words = view.replace("_", " ").split()
        if view in NOT_FRONTAL_VIEW_POSITIONS or _NOT_FRONTAL_WORDS.intersection(words):
            what = NOT_FRONTAL_VIEW_POSITIONS.get(view, "lateral, oblique or decubitus")
            return f"ViewPosition is {view!r} ({what}), not a frontal view"
        if words and words[0] in FRONTAL_VIEW_POSITIONS:
            if words[0] == "AP" and supine:
                notes.append(frontal_note)
            return None
        if code is None:
            notes.append(f"view not checked: ViewPosition {view!r} is not a known term (AP, PA, LL, RL, ...)")
            return None
    if code is None:
        notes.append("view not checked: no ViewPosition or View Code Sequence")
        return None
    key = code[:2]
    meaning = code[2].lower()
    if key in NOT_FRONTAL_VIEW_CODES or (
        key not in FRONTAL_VIEW_CODES and ("lateral" in meaning or "oblique" in meaning or "decubitus" in meaning)
    ):
        return f"View Code Sequence is {_code_text(code)}, not a frontal view"
    if key in FRONTAL_VIEW_CODES or meaning in ("antero-posterior", "postero-anterior", "frontal"):
        if (key == ("SCT", "399348003") or meaning == "antero-posterior") and supine:
            notes.append(frontal_note)
        return None
    notes.append(f"view not checked: View Code Sequence {_code_text(code)} is not a known view")
    return None


def _supine(ds: Any, view: str) -> bool:
    if "SUPINE" in view.split():
        return True
    code = _first_code(ds, "PatientOrientationModifierCodeSequence")
    if code is not None and (code[:2] in SUPINE_CODES or code[2].lower() == "supine"):
        return True
    # Patient Position (0018,5100): HFS / FFS are head- / feet-first supine.
    return _text(ds, "PatientPosition") in ("HFS", "FFS", "SUPINE")

