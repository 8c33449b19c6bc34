"""DICOM results a validator accepts, from every source, and a console that names no patient.

``agcnn predict --dicom-out`` runs (as a separate process, as a hospital runs it) over a corpus
of the real chest CR files of pydicom-data (RG1_*, uncompressed and JPEG 2000, lossless and
lossy) and of de-identified files as research exports hold them: no birth date, a hash in it,
an age without unit, names a validator or highdicom finds odd, values that break their VR.
Every object written is checked with ``dciodvfy`` (dicom3tools): no error. Nothing of the
headers' names, IDs, dates or UIDs may reach stdout or stderr.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from agcnn.data.dicom_write import write_dicom
from agcnn.dicom_out import DicomResult, object_paths, render_overlay, write_dicom_results
from agcnn.dicom_out.source import clean_source
from agcnn.labels import LABELS

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed: the objects cannot be validated"
)
DELETE = object()

# name -> header edits (DELETE removes the attribute). Each file also gets its own patient.
AWKWARD = {
    "birthdate_absent.dcm": {"PatientBirthDate": DELETE},
    "birthdate_empty.dcm": {"PatientBirthDate": ""},
    "birthdate_hash.dcm": {"PatientBirthDate": "9f86d081884c7d65"},
    "age_without_unit.dcm": {"PatientAge": "62"},
    "names_single.dcm": {"PatientName": "Wardqz", "ReferringPhysicianName": "Wardqx"},
    "names_latin_no_charset.dcm": {"PatientName": "O'Brien-Müllerqz^Seán Zoë", "SpecificCharacterSet": DELETE},
    "names_utf8.dcm": {"PatientName": "李qz^雷", "SpecificCharacterSet": "ISO_IR 192"},
    "names_control_chars.dcm": {"PatientName": "DOEqz^JANE\x01X", "PatientID": "IDqz\t42"},
    "names_too_many_parts.dcm": {"ReferringPhysicianName": "Aqz^B^C^D^E^F^G"},
    "values_break_vr.dcm": {
        "PatientSex": "male", "StudyDate": "2019.03.01", "StudyTime": "12:30:00",
        "AccessionNumber": "ACCqz-0123456789-TOO-LONG", "PatientSize": "175cm", "PatientWeight": "80kg",
        "StudyID": "STUDYqz-ID-TOO-LONG", "PatientOrientation": ["A", "F", "X"],
    },
    "no_body_part.dcm": {"BodyPartExamined": DELETE},
    "identity_removed.dcm": {"PatientIdentityRemoved": "YES", "PatientSex": DELETE},
    "identity_removed_method.dcm": {"PatientIdentityRemoved": "YES", "DeidentificationMethod": "PS3.15 basic profile"},
}
# Other kinds of source: a secondary capture of a film (no body part), MONOCHROME1 in RLE, CR in
# JPEG 2000 (each as write_dicom's keyword arguments).
KINDS = {
    "capture_ot.dcm": {"modality": "OT", "BodyPartExamined": None},
    "mono1_rle.dcm": {"photometric": "MONOCHROME1", "transfer_syntax": "1.2.840.10008.1.2.5"},
    "cr_j2k.dcm": {"modality": "CR", "transfer_syntax": "1.2.840.10008.1.2.4.90"},
}
RG1 = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for one file (warnings are allowed)."""
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def pydicom_data(name: str) -> Path | None:
    """A file of the installed pydicom-data package, or None (never downloaded)."""
    try:
        import data_store
    except ImportError:
        return None
    path = Path(data_store.__file__).parent / "data" / name
    return path if path.exists() else None


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, (h, w)).astype(np.uint16)


def write_awkward(path: Path, edits: dict, seed: int, **kind) -> pydicom.Dataset:
    """A small chest DX (or ``kind``) with the header edits applied, written without value validation."""
    write_dicom(path, _image(96, 80, seed), **{"modality": "DX", "ViewPosition": "PA", **kind},
                patient_name=f"LEAKqz^PATIENT{seed}", patient_id=f"LEAKID{seed:04d}qz",
                AccessionNumber=f"LEAKACC{seed:03d}", PatientBirthDate="19400305")
    ds = pydicom.dcmread(path)
    with config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in edits.items():
            if value is DELETE:
                if keyword in ds:
                    delattr(ds, keyword)
            elif isinstance(value, str) and dictionary_VR(keyword) in ("DS", "IS"):
                # pydicom would convert a number on assignment: the bytes go in as they are.
                raw = value.encode() + b" " * (len(value) % 2)
                tag = tag_for_keyword(keyword)
                ds[tag] = RawDataElement(BaseTag(tag), dictionary_VR(keyword), len(raw), raw, 0, False, True)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return ds


def identifiers(ds: pydicom.Dataset) -> set[str]:
    """The identifying values of a header, as they could be printed: names, IDs, dates, UIDs."""
    out = set()
    for kw in ("PatientName", "ReferringPhysicianName", "PatientID", "AccessionNumber", "PatientBirthDate",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        v = str(ds.get(kw) or "")
        out.update(part for part in [v, *v.replace("=", "^").split("^")] if len(part) >= 5)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, untrained_checkpoint) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", data={"resize": 72},
                                operating_points={"fusion": [0.5] * len(LABELS)})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, pydicom.Dataset]]:
    root = tmp_path_factory.mktemp("corpus")
    headers = {}
    (root / "deid").mkdir()
    for seed, (name, edits) in enumerate(AWKWARD.items()):
        headers[name] = write_awkward(root / "deid" / name, edits, seed)
    for seed, (name, kind) in enumerate(KINDS.items(), start=len(AWKWARD)):
        headers[name] = write_awkward(root / name, {}, seed, **kind)
    for name in RG1:
        src = pydicom_data(name)
        if src is not None:
            shutil.copy(src, root / name)
            headers[name] = pydicom.dcmread(src, stop_before_pixels=True)
    return root, headers


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AGCNN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "agcnn", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def predicted(checkpoint, corpus, tmp_path_factory):
    """One ``agcnn predict --dicom-out`` process over the corpus: (out, dicom folder, process)."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("predicted")
    proc = _cli("predict", "--checkpoint", str(checkpoint), "--input", str(root), "--output", str(out / "out"),
                "--dicom-out", str(out / "dicom"), "--workers", "1", "--batch-size", "4")
    return out / "out", out / "dicom", proc


def _rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def test_every_predicted_radiograph_gets_both_objects(predicted, corpus):
    out, dicom, proc = predicted
    _, headers = corpus
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out)
    assert sorted(rows) == sorted(f"deid/{n}" if n in AWKWARD else n for n in headers)
    assert {r["status"] for r in rows.values()} == {"ok"}, {p: r["reason"] for p, r in rows.items()}
    for rel, row in rows.items():
        assert row["dicom_results"].startswith("written"), (rel, row["dicom_results"])
        assert all(p.exists() for p in object_paths(dicom, rel)), rel
    n = len(rows)
    assert f"{n} of {n} DICOM results written" in proc.stderr.splitlines()[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dicom_results"]["written"] == n and manifest["dicom_results"]["not_written"] == 0


@needs_dciodvfy
def test_dciodvfy_reports_no_error_on_any_object(predicted):
    _, dicom, _ = predicted
    objects = sorted(dicom.rglob("*.dcm"))
    assert objects
    errors = {str(p.relative_to(dicom)): e for p in objects if (e := dciodvfy_errors(p))}
    assert not errors, errors
    print(f"dciodvfy: {len(objects)} objects, no error")


def test_invalid_source_values_are_corrected_or_dropped_and_counted(predicted):
    out, dicom, proc = predicted
    rows = _rows(out)

    def sr(name):
        return pydicom.dcmread(object_paths(dicom, f"deid/{name}")[0])

    # Type 2 attributes stay, empty, whether the source lacked them or held no valid value.
    for name in ("birthdate_absent.dcm", "birthdate_empty.dcm", "birthdate_hash.dcm"):
        ds = sr(name)
        assert "PatientBirthDate" in ds and ds.PatientBirthDate == "", name
    assert sr("age_without_unit.dcm").PatientAge == "062Y"
    broken = sr("values_break_vr.dcm")
    assert (broken.PatientSex, broken.StudyDate, broken.StudyTime) == ("M", "20190301", "123000")
    assert broken.AccessionNumber == "" and broken.StudyID == "" and "PatientSize" not in broken
    control = sr("names_control_chars.dcm")
    assert str(control.PatientName) == "DOEqz^JANEX" and control.PatientID == "IDqz42"
    assert sr("names_latin_no_charset.dcm").SpecificCharacterSet == "ISO_IR 192"
    assert str(sr("names_latin_no_charset.dcm").PatientName) == "O'Brien-Müllerqz^Seán Zoë"
    assert "PatientIdentityRemoved" not in sr("identity_removed.dcm")  # YES needs a method
    assert sr("identity_removed_method.dcm").PatientIdentityRemoved == "YES"
    # The row says what was changed, by attribute and rule, never with the value.
    note = rows["deid/birthdate_hash.dcm"]["dicom_results"]
    assert "PatientBirthDate: not a valid DA, dropped" in note and "9f86" not in note
    assert rows["deid/age_without_unit.dcm"]["dicom_results"].endswith("PatientAge: AS without unit, read as years")
    fixes = json.loads((out / "manifest.json").read_text())["dicom_results"]["this_run"]["source_attributes_corrected"]
    assert fixes["PatientBirthDate: not a valid DA, dropped"] == 1
    assert fixes["PatientSex: sex written as M / F / O"] == 1
    assert fixes["ReferringPhysicianName: PN with more than 5 components or 3 groups, dropped"] == 1
    assert fixes["PatientOrientation: 3 values where 2 allowed, dropped"] == 1
    # The console lists them by kind too (a count, the attribute and the rule).
    assert "values of the sources corrected or dropped in the DICOM results" in proc.stderr
    assert "1 x PatientAge: AS without unit, read as years" in proc.stderr


def test_no_identifier_reaches_the_console(predicted, corpus):
    out, _, proc = predicted
    _, headers = corpus
    console = proc.stdout + proc.stderr
    secrets = set().union(*(identifiers(ds) for ds in headers.values()))
    assert any("Wardqz" in s for s in secrets) and any("LEAKID" in s for s in secrets)  # the probe probes
    leaked = sorted(s for s in secrets if s in console)
    assert not leaked, leaked
    # The libraries did speak (highdicom warns about single-component names, with the name):
    # their messages are counted by kind, with the file, never quoted.
    assert "messages of the DICOM libraries" in proc.stderr
    assert "highdicom UserWarning" in proc.stderr and "deid/names_single.dcm" in proc.stderr
    library = json.loads((out / "manifest.json").read_text())["library_messages"]
    assert sum(v["count"] for v in library.values()) > 0
    assert "Wardqz" not in json.dumps(library)


def test_highdicom_would_quote_the_name_without_the_capture(corpus, tmp_path):
    # What the capture keeps from the console: highdicom's warning quotes the name itself.
    _, headers = corpus
    header = headers["names_single.dcm"]
    result = DicomResult(labels=LABELS, probabilities=[0.1] * len(LABELS), thresholds=None, box=(1, 2, 30, 40),
                         algorithm_version="0", checkpoint_sha256="0" * 64)
    picture = render_overlay(np.zeros((96, 80), np.uint8), height=96, width=80, box=result.box, field=(0, 0, 80, 96),
                             heat=np.eye(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_results(tmp_path, "x.dcm", header, result, picture=picture, map_name="m")
    assert any("Wardqz" in str(w.message) for w in caught)


@pytest.mark.parametrize("name, edits, laterality", [
    ("hand_left.dcm", {"BodyPartExamined": "HAND", "ImageLaterality": "L"}, "L"),
    ("hand_right_lower_case.dcm", {"BodyPartExamined": "HAND", "Laterality": "r"}, "R"),
    ("hand_no_side.dcm", {"BodyPartExamined": "HAND"}, ""),
    ("chest.dcm", {}, None),
])
def test_secondary_capture_laterality_type_2c(tmp_path, name, edits, laterality):
    # Laterality (General Series, Type 2C) is needed for a paired body part: the side the source
    # records, empty when it records none; absent for the chest, an unpaired one.
    ds = write_awkward(tmp_path / name, edits, 1)
    result = DicomResult(labels=LABELS, probabilities=[0.1] * len(LABELS), thresholds=None, box=(1, 2, 30, 40),
                         algorithm_version="0", checkpoint_sha256="0" * 64)
    picture = render_overlay(np.zeros((96, 80), np.uint8), height=96, width=80, box=result.box, field=(0, 0, 80, 96),
                             heat=np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr_path, sc_path = write_dicom_results(tmp_path / "out", name, ds, result, picture=picture, map_name="m")
    sc = pydicom.dcmread(sc_path)
    assert sc.get("Laterality") == laterality
    if DCIODVFY:
        assert not dciodvfy_errors(sc_path) and not dciodvfy_errors(sr_path)


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG3_J2KI.dcm"])
def test_real_extremity_film_keeps_its_side(tmp_path, name):
    # pydicom-data's RG3 is a CR of an extremity with Laterality R (predicted with --any-body-part).
    src = pydicom_data(name)
    if src is None:
        pytest.skip(f"{name} is not in the installed pydicom-data (pip install pydicom-data)")
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    result = DicomResult(labels=LABELS, probabilities=[0.2] * len(LABELS), thresholds=[0.5] * len(LABELS),
                         box=(100, 200, 900, 1000), algorithm_version="0", checkpoint_sha256="1" * 64)
    picture = render_overlay(np.zeros((256, 256), np.uint8), height=int(ds.Rows), width=int(ds.Columns),
                             box=result.box, field=(0, 0, int(ds.Columns), int(ds.Rows)), heat=np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr_path, sc_path = write_dicom_results(tmp_path, name, ds, result, picture=picture, map_name="m")
    assert pydicom.dcmread(sc_path).Laterality == "R"
    if DCIODVFY:
        assert not dciodvfy_errors(sc_path) and not dciodvfy_errors(sr_path)


@pytest.mark.parametrize("keyword, value, expected, kind", [
    ("PatientAge", "62", "062Y", "AS without unit, read as years"),
    ("PatientAge", "7m", "007M", "AS reformatted"),
    ("PatientAge", "sixty", None, "not a valid AS, dropped"),
    ("PatientBirthDate", "19400230", "", "not a valid DA, dropped"),  # no 30 February
    ("PatientBirthDate", "1940-03-05", "19400305", "date written as YYYYMMDD"),
    ("StudyTime", "25:00:00", "", "not a valid TM, dropped"),
    ("PatientSex", "f", "F", "sex written as M / F / O"),
    ("PatientSex", "unknown", "", "not M, F or O, dropped"),
    ("PatientWeight", "80kg", None, "not a valid DS, dropped"),
    ("PatientID", "X" * 70, "", "not a valid LO, dropped"),
    ("PatientName", "DOE^JANE", "DOE^JANE", None),
])
def test_clean_source_corrects_or_drops_each_kind(tmp_path, keyword, value, expected, kind):
    ds = write_awkward(tmp_path / "x.dcm", {keyword: value}, 3)
    fixes: Counter = Counter()
    clean = clean_source(pydicom.dcmread(tmp_path / "x.dcm", stop_before_pixels=True), fixes)
    # "": present and empty (Type 2); None: not copied (Type 3).
    got = None if keyword not in clean else str(clean[keyword].value or "")
    assert got == expected
    assert dict(fixes) == ({f"{keyword}: {kind}": 1} if kind else {})
    assert ds.SOPInstanceUID == clean.SOPInstanceUID


@pytest.mark.parametrize("declared, written, fixed", [
    ("ISO_IR 100", "ISO_IR 100", False),  # Latin-1 holds the name: kept as declared
    (DELETE, "ISO_IR 192", True),  # none declared, text beyond ASCII: UTF-8
    ("ISO_IR 999", "ISO_IR 192", True),  # a term pydicom does not know
])
def test_character_set_holds_the_copied_text(tmp_path, declared, written, fixed):
    write_awkward(tmp_path / "x.dcm", {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": declared}, 6)
    fixes: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = clean_source(pydicom.dcmread(tmp_path / "x.dcm", stop_before_pixels=True), fixes)
    assert clean.SpecificCharacterSet == written and str(clean.PatientName) == "Müller^Jürgen"
    assert bool(fixes) == fixed


def test_a_source_without_a_series_uid_names_it(tmp_path):
    from agcnn.dicom_out import SourceError

    write_awkward(tmp_path / "x.dcm", {"SeriesInstanceUID": DELETE}, 4)
    with pytest.raises(SourceError, match="SeriesInstanceUID") as info:
        clean_source(pydicom.dcmread(tmp_path / "x.dcm"))
    assert info.value.attribute == "SeriesInstanceUID"


# ---------------------------------------------------------------------------- no silent loss

@pytest.mark.slow
def test_results_not_written_are_counted_exit_1_and_retried(checkpoint, tmp_path, capsys):
    from agcnn.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_awkward(inp / f"ok{i}.dcm", {}, 10 + i)
    broken = write_awkward(inp / "no_series.dcm", {"SeriesInstanceUID": DELETE}, 20)
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
            "--dicom-out", str(dicom), "--workers", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "4 files: 4 ok, 0 skipped, 0 failed; 3 of 4 DICOM results written (the notes column says why not)" in err
    with open(out / "predictions.csv", newline="") as f:
        row = {r["path"]: r for r in csv.DictReader(f)}["no_series.dcm"]
    # The reason names the attribute, not just an exception class.
    assert row["status"] == "ok" and row[LABELS[0]]
    assert "DICOM results not written: the source has no SeriesInstanceUID, which the results must reference" in row["notes"]
    assert not any(p.exists() for p in object_paths(dicom, "no_series.dcm"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dicom_results"]["written"] == 3 and manifest["dicom_results"]["not_written"] == 1

    assert main(args) == 1  # a plain resume keeps the row, and still says so
    assert "3 of 4 DICOM results written" in capsys.readouterr().err
    # The source is re-exported with its series: --retry-failed writes its results.
    broken.SeriesInstanceUID = pydicom.uid.generate_uid()
    broken.save_as(inp / "no_series.dcm")
    assert main([*args, "--retry-failed"]) == 0
    err = capsys.readouterr().err
    assert "4 of 4 DICOM results written" in err
    assert all(p.exists() for p in object_paths(dicom, "no_series.dcm"))
    rows = _rows(out)
    assert rows["no_series.dcm"]["dicom_results"] == "written" and "not written" not in rows["no_series.dcm"]["notes"]
    assert json.loads((out / "manifest.json").read_text())["retried_failed_rows"] == 1


def test_a_library_error_is_reported_by_step_and_module(tmp_path, monkeypatch):
    from agcnn.dicom_out import DicomWriteError, sr

    def broken(*_, **__):
        raise ValueError('Value "DOE^JANE" of PatientName is not what highdicom wants')

    monkeypatch.setattr(sr, "_findings_group", broken)
    ds = write_awkward(tmp_path / "x.dcm", {}, 5)
    result = DicomResult(labels=LABELS, probabilities=[0.1] * len(LABELS), thresholds=None, box=(1, 2, 30, 40),
                         algorithm_version="0", checkpoint_sha256="0" * 64)
    with warnings.catch_warnings(), pytest.raises(DicomWriteError) as info:
        warnings.simplefilter("ignore")
        write_dicom_results(tmp_path / "out", "x.dcm", ds, result, picture=np.zeros((8, 8, 3), np.uint8), map_name="m")
    message = str(info.value)
    assert message.startswith("building the SR failed (ValueError in ") and "about PatientName" in message
    assert "DOE" not in message and info.value.step == "building the SR"
    assert not list((tmp_path / "out").rglob("*.dcm"))  # nothing half-written: the SC waits for the SR


# ---------------------------------------------------------------------------- damaged files

def _mutants(folder: Path, n: int = 24) -> list[str]:
    """Flipped bits and cuts of small chest films in several codecs."""
    import random

    from pydicom.uid import JPEG2000Lossless, RLELossless

    from agcnn.data.dicom_write import encodable_transfer_syntaxes

    rng = random.Random(7)
    folder.mkdir()
    codecs = [ts for ts in (RLELossless, JPEG2000Lossless) if ts in encodable_transfer_syntaxes()]
    sources = []
    for i, ts in enumerate([None, *codecs]):
        path = folder.parent / f"source{i}.dcm"
        write_dicom(path, _image(128, 112, 30 + i), modality="CR", ViewPosition="PA", patient_name="DAMAGEDqz^PATIENT",
                    **({"transfer_syntax": ts} if ts else {}))
        # Fixed UIDs and dates: the same bits are flipped on every run.
        ds = pydicom.dcmread(path)
        for j, kw in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
            setattr(ds, kw, f"1.2.826.0.1.3680043.8.498.{i}.{j}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.save_as(path)
        sources.append(path.read_bytes())
    names = []
    for i in range(n):
        data = bytearray(sources[i % len(sources)])
        if i % 2:
            data = data[: rng.randrange(200, len(data) - 1)]
        else:
            for _ in range(rng.randrange(1, 40)):
                p = rng.randrange(132, len(data))
                data[p] ^= 1 << rng.randrange(8)
        names.append(f"mutant{i:02d}.dcm")
        (folder / names[-1]).write_bytes(bytes(data))
    if RLELossless in codecs:
        # One byte of the RLE stream that makes pylibjpeg-rle panic (Rust prints its own
        # message and, with RUST_BACKTRACE set, a backtrace on stderr). Found by trying bytes.
        data = bytearray(sources[1 + codecs.index(RLELossless)])
        frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(bytes(data))).PixelData,
                                                    number_of_frames=1))
        data[bytes(data).find(frame) + 22323] = 165
        names.append("rle_codec_panic.dcm")
        (folder / names[-1]).write_bytes(bytes(data))
    return names


@pytest.mark.slow
def test_damaged_files_each_get_a_row_and_no_traceback(checkpoint, tmp_path):
    names = sorted(_mutants(tmp_path / "damaged"))
    out = tmp_path / "out"
    proc = _cli("predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "damaged"), "--output", str(out),
                "--dicom-out", str(tmp_path / "dicom"), "--workers", "1", "--batch-size", "4")
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr and "DAMAGEDqz" not in proc.stderr + proc.stdout
    rows = _rows(out)
    assert sorted(rows) == names
    counts = Counter(r["status"] for r in rows.values())
    assert counts["failed"] >= len(names) // 4, counts  # the cuts at least
    # Every damaged file is at most its row: the console holds the summary and the counts by kind.
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("predict:")]
    assert len(lines) <= 12, lines
    assert f"{len(names)} files: {counts['ok']} ok, 0 skipped, {counts['failed']} failed" in lines[-1]
    # pydicom did log about them, a codec panicked: counted by kind, with the files.
    assert "messages of the DICOM libraries (not shown" in proc.stderr and "pydicom WARNING" in proc.stderr
    if "rle_codec_panic.dcm" in names:
        assert "stderr output of a Rust panic, first in rle_codec_panic.dcm" in proc.stderr
        assert rows["rle_codec_panic.dcm"]["status"] == "failed"
    # --debug shows what was kept back.
    debug = _cli("--debug", "predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "damaged"),
                 "--output", str(tmp_path / "out-debug"), "--workers", "0")
    assert debug.returncode == proc.returncode, debug.stderr
    assert "messages of the DICOM libraries (shown above)" in debug.stderr
    assert "End of file reached" in debug.stderr and ("panicked at" in debug.stderr or "rle_codec_panic.dcm" not in names)
