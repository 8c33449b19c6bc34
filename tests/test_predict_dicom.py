"""agcnn predict on a hospital folder: scope (body part, view), --retry-failed, --dicom-out, and a
restart right after ``kill -9``.

The folder mixes what a research PACS export holds besides frontal chest films: a lateral chest
view, a hip and a hand, images without any body part or view attribute, a secondary capture.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from agcnn.cli import main
from agcnn.config import Config
from agcnn.data.dicom_write import write_dicom
from agcnn.dicom_out import object_paths
from agcnn.labels import LABELS
from agcnn.predict.journal import lock_output
from agcnn.errors import UsageError

PATIENT = dict(patient_name="DOE^JANE^SECRETNAME", patient_id="PID-98765", AccessionNumber="ACC-55555")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) / (2 * (0.15 * h) ** 2))
    return (blob * 3000 + rng.integers(0, 800, (h, w))).astype(np.uint16)


def _code(value: str, scheme: str, meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return [item]


# relative path -> (status, reason code, a note the row must carry or None)
EXPECTED = {
    "chest_pa.dcm": ("ok", "", None),
    "chest_lateral.dcm": ("skipped", "not_frontal", None),
    "hip.dcm": ("skipped", "out_of_scope", None),
    "hand_region.dcm": ("skipped", "out_of_scope", None),
    "chest_ap_supine.dcm": ("ok", "", "AP supine"),
    "no_attributes.dcm": ("ok", "", "body part not checked"),
    "capture.dcm": ("ok", "", "view not checked"),
    "chest.png": ("ok", "", "body part and view not checked: PNG"),
}
DICOM_OK = ["capture.dcm", "chest_ap_supine.dcm", "chest_pa.dcm", "no_attributes.dcm"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, untrained_checkpoint) -> Path:
    thresholds = [0.5] * len(LABELS)
    thresholds[1] = None  # a finding without an operating point: no call
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", data={"resize": 72},
                                operating_points={"fusion": thresholds})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    write_dicom(root / "chest_pa.dcm", _image(100, 80, 1), modality="DX", ViewPosition="PA", **PATIENT)
    write_dicom(root / "chest_lateral.dcm", _image(100, 80, 2), modality="DX", ViewPosition="LL", **PATIENT)
    write_dicom(root / "hip.dcm", _image(90, 70, 3), modality="CR", BodyPartExamined="HIP", ViewPosition="AP", **PATIENT)
    write_dicom(root / "hand_region.dcm", _image(80, 60, 4), modality="CR", BodyPartExamined=None,
                AnatomicRegionSequence=_code("85562004", "SCT", "Hand"), **PATIENT)
    write_dicom(root / "chest_ap_supine.dcm", _image(96, 96, 5), modality="DX", ViewPosition="AP",
                PatientOrientationModifierCodeSequence=_code("40199007", "SCT", "supine"), **PATIENT)
    write_dicom(root / "no_attributes.dcm", _image(72, 64, 6), modality="DX", BodyPartExamined=None, **PATIENT)
    write_dicom(root / "capture.dcm", _image(64, 64, 7), modality="OT", BodyPartExamined=None, **PATIENT)
    Image.fromarray((_image(80, 100, 8) // 16).clip(0, 255).astype(np.uint8)).save(root / "chest.png")
    return root


def _predict(checkpoint, inp, out, *extra, workers: int = 0) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
                 "--workers", str(workers), "--batch-size", "3", *map(str, extra)])


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def scoped(checkpoint, mixed, tmp_path_factory):
    """One run over the mixed folder with --dicom-out: (output, DICOM folder, exit status, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("scoped") / "out"
    dicom = out.parent / "dicom"
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = _predict(checkpoint, mixed, out, "--dicom-out", dicom, workers=2)
    return out, dicom, rc, buf.getvalue()


def test_mixed_folder_statuses_reasons_and_notes(scoped):
    out, _, rc, err = scoped
    assert rc == 0, err  # skipped files are not failures
    rows = _rows(out)
    assert sorted(rows) == sorted(EXPECTED)
    for path, (status, code, note) in EXPECTED.items():
        row = rows[path]
        assert (row["status"], row["reason"].split(":", 1)[0]) == (status, code), (path, row["reason"])
        if note:
            assert note in row["notes"], (path, row["notes"])
    # The reason says which attribute held which value; skipped DICOMs keep their UIDs.
    assert "BodyPartExamined is 'HIP'" in rows["hip.dcm"]["reason"]
    assert "Anatomic Region Sequence is (85562004, SCT, 'Hand')" in rows["hand_region.dcm"]["reason"]
    assert "ViewPosition is 'LL' (left lateral)" in rows["chest_lateral.dcm"]["reason"]
    assert rows["chest_lateral.dcm"]["reason"].endswith("(--any-view predicts it anyway)")
    assert rows["hip.dcm"]["reason"].endswith("(--any-body-part predicts it anyway)")
    assert all(rows[p]["sop_instance_uid"] for p in ("hip.dcm", "hand_region.dcm", "chest_lateral.dcm"))
    assert not any(rows[p][LABELS[0]] for p in ("hip.dcm", "hand_region.dcm", "chest_lateral.dcm"))
    assert "not checked" not in rows["chest_pa.dcm"]["notes"]
    # The summary line counts each reason.
    line = err.strip().splitlines()[-1]
    assert "8 files: 5 ok, 3 skipped, 0 failed (not_frontal 1, out_of_scope 2)" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scope"] == {"any_body_part": False, "any_view": False}
    assert manifest["reasons"] == {"skipped:not_frontal": 1, "skipped:out_of_scope": 2}


def test_overrides_predict_everything_and_are_recorded(checkpoint, mixed, tmp_path, capsys):
    out = tmp_path / "all"
    assert _predict(checkpoint, mixed, out, "--any-body-part", "--any-view") == 0
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert "not checked" not in rows["no_attributes.dcm"]["notes"]  # checks switched off: nothing to say
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scope"] == {"any_body_part": True, "any_view": True}
    assert manifest["arguments"]["any_body_part"] is True and manifest["arguments"]["any_view"] is True
    # A resumed run must decide scope the same way.
    assert _predict(checkpoint, mixed, out, "--any-view") == 2
    assert "was started with --any-body-part" in capsys.readouterr().err
    only_view = tmp_path / "view"
    assert _predict(checkpoint, mixed, only_view, "--any-view") == 0
    assert _rows(only_view)["chest_lateral.dcm"]["status"] == "ok"
    assert _rows(only_view)["hip.dcm"]["reason"].startswith("out_of_scope")


def _sr_values(path: Path):
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    probs = {m.name.value: m.value for m in group.get_measurements()}
    calls = {q.name.value.removesuffix("-call"): q.value.meaning for q in group.get_qualitative_evaluations()}
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    return sr, probs, calls, roi.roi


def test_dicom_out_objects_read_back_against_predictions_csv(scoped, mixed):
    out, dicom, _, _ = scoped
    rows = _rows(out)
    written = sorted(str(p.relative_to(dicom)) for p in dicom.rglob("*") if p.is_file())
    assert written == sorted(str(Path(name + suffix)) for name in DICOM_OK for suffix in (".sc.dcm", ".sr.dcm"))
    for name in DICOM_OK:
        row, src = rows[name], pydicom.dcmread(mixed / name, stop_before_pixels=True)
        sr_path, sc_path = object_paths(dicom, name)
        sr, probs, calls, region = _sr_values(sr_path)
        assert sr.PatientID == src.PatientID and sr.StudyInstanceUID == src.StudyInstanceUID == row["study_instance_uid"]
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == row["sop_instance_uid"]
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == row["sop_instance_uid"]
        assert probs == {lab: float(row[lab]) for lab in LABELS}  # the CSV's values, exactly
        assert LABELS[1] not in calls  # no operating point, no call
        assert calls == {lab: ("Present" if row[f"call_{lab}"] == "1" else "Absent") for lab in LABELS if lab != LABELS[1]}
        x0, y0, x1, y1 = (float(row[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
        np.testing.assert_array_equal(region.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        sc = pydicom.dcmread(sc_path)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == row["sop_instance_uid"]
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
        # The map drawn is the fusion CAM of the most probable finding called positive.
        called = [(float(row[lab]), lab) for lab in LABELS if row[f"call_{lab}"] == "1"]
        if called:
            assert f"fusion CAM of {max(called)[1]} (probability" in sc.ImageComments, sc.ImageComments
        else:
            assert "attention heatmap (paper Eq. 3); no finding called positive" in sc.ImageComments
        assert len({sr.SOPInstanceUID, sc.SOPInstanceUID, src.SOPInstanceUID}) == 3
    # The identifiers are in the DICOM objects only, never in the tables.
    for table in ("predictions.csv", "predictions.jsonl", "manifest.json"):
        text = (out / table).read_text()
        assert all(v not in text for v in PATIENT.values()), table


def test_retry_failed_replaces_failed_rows_only(checkpoint, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    write_dicom(inp / "good.dcm", _image(80, 80, 1), modality="DX")
    write_dicom(inp / "later.dcm", _image(80, 80, 2), modality="DX")
    whole = (inp / "later.dcm").read_bytes()
    (inp / "later.dcm").write_bytes(whole[: len(whole) // 2])  # cut short: failed
    (inp / "notes.txt").write_text("x")
    out = tmp_path / "out"
    assert _predict(checkpoint, inp, out) == 1
    first = _rows(out)
    assert first["later.dcm"]["status"] == "failed" and first["notes.txt"]["status"] == "skipped"

    (inp / "later.dcm").write_bytes(whole)  # re-exported
    assert _predict(checkpoint, inp, out) == 1  # a plain resume keeps the failed row
    assert _rows(out)["later.dcm"]["status"] == "failed"
    assert _predict(checkpoint, inp, out, "--retry-failed") == 0
    rows = _rows(out)
    assert sorted(rows) == ["good.dcm", "later.dcm", "notes.txt"]
    assert rows["later.dcm"]["status"] == "ok" and rows["later.dcm"][LABELS[0]]
    assert rows["good.dcm"] == first["good.dcm"] and rows["notes.txt"] == first["notes.txt"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retried_failed_rows"] == 1 and manifest["rows_this_run"] == 1
    assert manifest["arguments"]["retry_failed"] is True
    # Nothing failed any more: a retry has nothing to do.
    assert _predict(checkpoint, inp, out, "--retry-failed") == 0
    assert json.loads((out / "manifest.json").read_text())["rows_this_run"] == 0


def test_the_lock_is_not_inherited_by_child_processes(tmp_path):
    # A process takes the lock, forks a child that lives on (as a loader worker did), and dies.
    script = f"""
import os, sys, time
from agcnn.predict.journal import lock_output
from pathlib import Path
lock = lock_output(Path({str(tmp_path)!r}))
pid = os.fork()
if pid == 0:
    os.close(1)  # let the caller see the end of the output at once
    os.close(2)
    time.sleep(30)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.strip())
    try:
        os.kill(child, 0)  # the child is still alive ...
        lock = lock_output(tmp_path)  # ... and the lock is free at once
        lock.close()
    finally:
        os.kill(child, signal.SIGKILL)
    # While a process holds it, another is refused.
    holder = subprocess.Popen([sys.executable, "-c", f"""
from agcnn.predict.journal import lock_output
from pathlib import Path
import sys, time
lock = lock_output(Path({str(tmp_path)!r}))
print("locked", flush=True)
time.sleep(30)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match="another `agcnn predict` is writing"):
            lock_output(tmp_path)
    finally:
        holder.kill()
        holder.wait()


_SLOW_RUNNER = """
import sys, time
import agcnn.predict.journal as j
append = j.Journal.append
def slow(self, rows):
    append(self, rows)
    time.sleep(0.3)  # room for the test to kill the process between batches
j.Journal.append = slow
from agcnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the loader's workers")
def test_restart_right_after_kill_9_with_workers(checkpoint, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    n = 14
    for i in range(n):
        write_dicom(inp / f"IM{i:03d}.dcm", _image(64 + i, 64, i), modality="DX", ViewPosition="PA")
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
            "--dicom-out", str(dicom), "--workers", "2", "--batch-size", "2"]
    runner = tmp_path / "runner.py"
    runner.write_text(_SLOW_RUNNER)
    journal = out / "predictions.jsonl"
    proc = subprocess.Popen([sys.executable, str(runner), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
                break
            if proc.poll() is not None:
                pytest.fail("the predict process ended before it could be killed")
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert workers, "no loader worker processes found"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # What a scheduler does after a preemption: start again at once.
    assert main(args) == 0
    # The workers died with their parent, not 5 s later.
    assert not [w for w in workers if _alive(w)]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == [f"IM{i:03d}.dcm" for i in range(n)]
    assert all(r["status"] == "ok" for r in rows)
    assert len(journal.read_text().splitlines()) == n
    files = sorted(p.name for p in dicom.rglob("*") if p.is_file())
    assert files == sorted(f"IM{i:03d}.dcm{s}" for i in range(n) for s in (".sc.dcm", ".sr.dcm"))  # no temp files
    by_sop = {}
    for r in rows:
        sr = pydicom.dcmread(object_paths(dicom, r["path"])[0])
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        by_sop.setdefault(ref.ReferencedSOPInstanceUID, []).append(r["path"])
    assert sorted(by_sop) == sorted(r["sop_instance_uid"] for r in rows)  # one SR per instance


def test_leftover_temporary_objects_are_removed_for_this_share_only(tmp_path):
    from agcnn.predict.listing import shard_of
    from agcnn.predict.outputs import prepare_dicom_out as _prepare_dicom_out

    folder = tmp_path / "dicom"
    (folder / "sub").mkdir(parents=True)
    names = [f"sub/IM{i}.dcm" for i in range(8)]
    assert 0 < sum(shard_of(rel, 2) == 0 for rel in names) < len(names)  # both shares have some
    for rel in names:
        for suffix in (".sr.dcm", ".sc.dcm"):
            (folder / "sub" / f".{rel.split('/')[1]}{suffix}.tmp").write_bytes(b"partial")
    (folder / "sub" / "IM0.dcm.sr.dcm").write_bytes(b"kept")
    _prepare_dicom_out(folder, (0, 2))
    left = {p.name for p in (folder / "sub").iterdir()}
    for rel in names:
        mine = shard_of(rel, 2) == 0
        base = rel.split("/")[1]
        assert (f".{base}.sr.dcm.tmp" in left) != mine and (f".{base}.sc.dcm.tmp" in left) != mine
    assert "IM0.dcm.sr.dcm" in left
    _prepare_dicom_out(folder, None)
    assert {p.name for p in (folder / "sub").iterdir()} == {"IM0.dcm.sr.dcm"}


def test_each_predicted_dicom_file_is_parsed_once(tmp_path, monkeypatch):
    # The reader hands back the header it parsed: the identifier columns and the DICOM results
    # read from it, not from a second and third dcmread of the same file.
    import pydicom as pd

    from agcnn.data.transforms import transforms_from_config
    from agcnn.predict.records import load_record

    write_dicom(tmp_path / "chest.dcm", _image(80, 64, 3), modality="DX", ViewPosition="PA", **PATIENT)
    calls = []
    real = pd.dcmread
    monkeypatch.setattr(pd, "dcmread", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = Config.from_dict({"data": {"image_size": 64, "highres_size": 64, "resize": 72}})
    rec = load_record(str(tmp_path / "chest.dcm"), "chest.dcm", transforms_from_config(cfg.data, train=False),
                      identifiers=True, previews=True, headers=True)
    assert rec["status"] == "ok" and len(calls) == 1
    assert rec["PatientID"] == PATIENT["patient_id"] and rec["AccessionNumber"] == PATIENT["AccessionNumber"]
    header = rec["dicom_header"]
    assert header.SOPInstanceUID == rec["sop_instance_uid"] and "PixelData" not in header
    assert str(header.PatientName) == PATIENT["patient_name"]
