"""agcnn predict / merge over a generated PACS-like export: one row per file, whatever it holds.

The folder mixes radiographs (MONOCHROME1/2, RLE, JPEG 2000, PNG, no extension, nested) with
what real exports contain next to them: a CT slice, a structured report, a DICOMDIR, an HTML
page saved as .dcm, a truncated copy, an empty file, a hidden file, a README, a pipe, a broken
link, a link duplicating a file, a link looping to a parent folder, a folder named like a file,
and a file the reader may not open (simulated: the tests run as root in CI, where chmod 000
does not stop reads).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agcnn.cli import main
from agcnn.data import readers
from agcnn.data.dicom_write import encodable_transfer_syntaxes, write_dicom
from agcnn.labels import LABELS
from agcnn.data.geometry import Geometry
from agcnn.predict import parse_shard, shard_of

# Identifying values written into the test files; none may appear in an output folder.
SECRETS = {
    "PatientName": "DOE^JANE^SECRETNAME",
    "PatientID": "PID-98765",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC-55555",
}
IDENT = dict(
    patient_name=SECRETS["PatientName"],
    patient_id=SECRETS["PatientID"],
    PatientBirthDate=SECRETS["PatientBirthDate"],
    AccessionNumber=SECRETS["AccessionNumber"],
)

# relative path -> (status, reason code); None = no row (a duplicate reached through a link).
EXPECTED = {
    "ok/mono2.dcm": ("ok", ""),
    "ok/mono1_rle.dcm": ("ok", ""),
    "ok/chest.png": ("ok", ""),
    "nested/deeper/deepest/IM000123": ("ok", ""),
    "folder.dcm/inside.dcm": ("ok", ""),
    "ct/slice.dcm": ("skipped", "unsupported_modality"),
    "reports/sr.dcm": ("skipped", "no_pixel_data"),
    "DICOMDIR": ("skipped", "no_pixel_data"),
    "page.dcm": ("skipped", "not_an_image"),
    "README.txt": ("skipped", "not_an_image"),
    ".hidden": ("skipped", "not_an_image"),
    "pipe.dcm": ("skipped", "not_an_image"),
    "truncated.dcm": ("failed", "truncated"),
    "empty.dcm": ("failed", "empty_file"),
    "locked.dcm": ("failed", "unreadable"),
    "dangling.dcm": ("failed", "unreadable"),
}


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) / (2 * (0.15 * h) ** 2))
    return (blob * 3000 + rng.integers(0, 800, (h, w))).astype(np.uint16)


def _non_image_dicom(path: Path, sop_class) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if sop_class == MediaStorageDirectoryStorage:
        ds.FileSetID = "EXPORT"
        ds.DirectoryRecordSequence = []
    else:
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "SR"
        ds.PatientName, ds.PatientID = SECRETS["PatientName"], SECRETS["PatientID"]
        ds.PatientBirthDate, ds.AccessionNumber = SECRETS["PatientBirthDate"], SECRETS["AccessionNumber"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.ContentSequence = []
    ds.save_as(path, enforce_file_format=True)


def _write_png(path: Path, h: int, w: int) -> None:
    from PIL import Image

    Image.fromarray((_image(h, w, 7) // 16).clip(0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, untrained_checkpoint) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", data={"resize": 72},
                                operating_points={"fusion": [0.5] * len(LABELS)})


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, checkpoint) -> Path:
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("ckpt2") / "other.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    root = tmp_path_factory.mktemp("export")
    for sub in ("ok", "nested/deeper/deepest", "ct", "reports", "folder.dcm"):
        (root / sub).mkdir(parents=True)
    write_dicom(root / "ok/mono2.dcm", _image(100, 80, 1), **IDENT)
    inverted = (4095 - _image(90, 120, 2).clip(0, 4095)).astype(np.uint16)
    write_dicom(root / "ok/mono1_rle.dcm", inverted, photometric="MONOCHROME1", transfer_syntax=RLELossless, **IDENT)
    j2k = JPEG2000Lossless if JPEG2000Lossless in encodable_transfer_syntaxes() else RLELossless
    write_dicom(root / "nested/deeper/deepest/IM000123", _image(96, 96, 3), transfer_syntax=j2k, modality="CR", **IDENT)
    write_dicom(root / "folder.dcm/inside.dcm", _image(64, 70, 4), **IDENT)
    _write_png(root / "ok/chest.png", 80, 100)
    write_dicom(root / "ct/slice.dcm", _image(64, 64, 5), modality="CT", **IDENT)
    from pydicom.uid import BasicTextSRStorage, MediaStorageDirectoryStorage

    _non_image_dicom(root / "reports/sr.dcm", BasicTextSRStorage)
    _non_image_dicom(root / "DICOMDIR", MediaStorageDirectoryStorage)
    (root / "page.dcm").write_text("<!DOCTYPE html><html><body>Session expired</body></html>")
    (root / "README.txt").write_text("export of 2026-11-25\n")
    (root / ".hidden").write_bytes(b"\x00\x01junk")
    os.mkfifo(root / "pipe.dcm")
    data = (root / "ok/mono2.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (root / "empty.dcm").write_bytes(b"")
    (root / "locked.dcm").write_bytes(data)
    os.symlink("does-not-exist.dcm", root / "dangling.dcm")
    os.symlink("ok/mono2.dcm", root / "link_dup.dcm")  # same file as ok/mono2.dcm: listed once
    os.symlink("..", root / "nested/deeper/loop")  # a loop back to a parent: not entered twice
    return root


def _lock(mp: pytest.MonkeyPatch) -> None:
    """``locked.dcm`` cannot be read: what a chmod 000 file does for a non-root user."""
    real = readers.read_image_with_info

    def read(path, **kw):
        if os.path.basename(path) == "locked.dcm":
            raise readers.UnusableImageError("unreadable", "permission denied; give the reading user read access to the file")
        return real(path, **kw)

    mp.setattr(readers, "read_image_with_info", read)


@pytest.fixture
def locked(monkeypatch):
    _lock(monkeypatch)


@pytest.fixture(scope="module")
def baseline(checkpoint, export, tmp_path_factory):
    """One run over the export with every optional output, in DataLoader worker processes.

    Returns (output folder, exit status, captured stdout + stderr).
    """
    out = tmp_path_factory.mktemp("baseline") / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        _lock(mp)
        # workers=2: decoding in worker processes, failures passed through the collate.
        rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(export), "--output", str(out),
                   "--workers", "2", "--batch-size", "3", "--overlays", "--all-branches"])
    return out, rc, buf.getvalue()


def _predict(checkpoint, inp, out, *extra) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out), "--workers", "0",
                 "--batch-size", "4", *map(str, extra)])


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _by_path(rows):
    return {r["path"]: r for r in rows}


# ---------------------------------------------------------------------- small functions

def test_box_to_original_golden():
    # resize 72, crop 64 at offset 4; the original is 144 wide (x2) and 100 high (x100/72).
    geo = Geometry(resize=72, image_size=64, highres_size=64)
    assert geo.to_original((0, 0, 64, 64), height=100, width=144) == (8, 5, 136, 95)
    assert geo.to_original((10, 20, 30, 40), height=72, width=72) == (14, 24, 34, 44)
    # highres 128 at image 64: the box doubles before the crop offset (round((144 - 128) / 2) = 8).
    assert Geometry(72, 64, 128).to_original((0, 0, 64, 64), height=144, width=144) == (8, 8, 136, 136)


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_parse_shard_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="K/N|0..N-1"):
        parse_shard(text)


def test_shard_of_is_stable_and_covers():
    paths = [f"p{i}/IM{i:04d}" for i in range(200)]
    shares = [shard_of(p, 4) for p in paths]
    assert shares == [shard_of(p, 4) for p in paths]
    assert set(shares) == {0, 1, 2, 3}


# ---------------------------------------------------------------------- the awkward export

def test_one_row_per_file_with_status_and_reason(baseline):
    out, rc, logs = baseline
    assert rc == 1  # truncated, empty, unreadable, dangling: usable-looking files failed
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert paths == sorted(EXPECTED), "exactly one row per file, sorted, no duplicate through the link or the loop"
    for r in rows:
        status, code = EXPECTED[r["path"]]
        assert r["status"] == status, r
        assert r["reason"].split(":")[0] == code if code else r["reason"] == "", r
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        probs = [float(r[c]) for c in LABELS] + [float(r[f"{b}_{c}"]) for b in ("global", "local") for c in LABELS]
        assert all(0.0 <= p <= 1.0 for p in probs)
        x0, y0, x1, y1 = (int(r[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
        assert 0 <= x0 < x1 <= int(r["width"]) and 0 <= y0 < y1 <= int(r["height"])
        assert all(r[f"call_{c}"] in ("0", "1") for c in LABELS)
    for r in rows:
        if r["status"] != "ok":
            assert all(r[c] == "" for c in LABELS)
    rows_by = _by_path(rows)
    assert rows_by["ok/mono1_rle.dcm"]["notes"].count("MONOCHROME1 inverted") == 1
    assert rows_by["ok/mono2.dcm"]["sop_instance_uid"].startswith("1.2.")
    assert rows_by["ct/slice.dcm"]["study_instance_uid"]  # skipped DICOMs keep their UIDs for joining
    assert rows_by["ok/chest.png"]["sop_instance_uid"] == ""
    # The JSON Lines twin holds the same rows.
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["path"] for x in lines] == paths
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"failed": 4, "ok": 5, "skipped": 7}
    assert manifest["labels"] == list(LABELS) and len(manifest["checkpoint"]["sha256"]) == 64
    assert manifest["listing"]["duplicates_via_links"] == 1 and manifest["listing"]["directory_loops"] >= 1
    assert "4 failed" in logs
    # Overlays: one picture per predicted image, under the same relative path.
    pngs = sorted((out / "overlays").rglob("*.png"))
    assert {str(p.relative_to(out / "overlays"))[: -len(".png")] for p in pngs} == {p for p, (s, _) in EXPECTED.items() if s == "ok"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_exit_0_when_every_usable_file_is_predicted(checkpoint, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_dicom(inp / "a.dcm", _image(64, 64, 1))
    _write_png(inp / "b.png", 64, 80)
    (inp / "notes.txt").write_text("not an image")
    assert _predict(checkpoint, inp, tmp_path / "out") == 0
    assert [r["status"] for r in _rows(tmp_path / "out")] == ["ok", "ok", "skipped"]
    # Running again finds everything done: nothing new, same result.
    before = (tmp_path / "out/predictions.csv").read_text()
    assert _predict(checkpoint, inp, tmp_path / "out") == 0
    assert (tmp_path / "out/predictions.csv").read_text() == before
    # An output folder inside the input is not read as input, on the first run or a re-run.
    for _ in range(2):
        assert _predict(checkpoint, inp, inp / "results") == 0
        assert [r["path"] for r in _rows(inp / "results")] == ["a.dcm", "b.png", "notes.txt"]


def test_an_overlay_that_cannot_be_written_costs_only_the_picture(checkpoint, tmp_path, monkeypatch):
    from agcnn import overlays

    inp = tmp_path / "in"
    inp.mkdir()
    write_dicom(inp / "a.dcm", _image(64, 64, 1))
    _write_png(inp / "b.png", 64, 80)

    def disk_full(path, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(overlays, "write_overlay", disk_full)
    assert _predict(checkpoint, inp, tmp_path / "out", "--overlays") == 0
    rows = _rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all("overlay not written: No space left on device" in r["notes"] for r in rows)
    assert all(r["Nodule"] for r in rows)


def test_no_identifiers_in_outputs_unless_asked(checkpoint, export, baseline, tmp_path, locked):
    out, _, logs = baseline
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + logs.encode()
    for key, value in SECRETS.items():
        for form in {value, value.replace("^", " ")}:
            assert form.encode() not in everything, f"{key} leaked into the outputs"
    assert "PatientID" not in _rows(out)[0]

    out_id = tmp_path / "identified"
    assert _predict(checkpoint, export, out_id, "--include-identifiers") == 1
    rows = _by_path(_rows(out_id))
    assert rows["ok/mono2.dcm"]["PatientID"] == SECRETS["PatientID"]
    assert rows["ok/mono2.dcm"]["AccessionNumber"] == SECRETS["AccessionNumber"]
    assert len(rows["ok/mono2.dcm"]["StudyDate"]) == 8
    assert rows["reports/sr.dcm"]["PatientID"] == SECRETS["PatientID"]
    assert rows["ok/chest.png"]["PatientID"] == ""
    assert SECRETS["PatientID"] not in (out_id / "manifest.json").read_text()


def test_shards_and_merge_equal_the_unsharded_run(checkpoint, export, baseline, tmp_path, locked, monkeypatch, capsys):
    whole, sharded = baseline[0], tmp_path / "sharded"
    opts = ("--overlays", "--all-branches")
    assert _predict(checkpoint, export, sharded, "--shard", "0/2", *opts) in (0, 1)
    # Under torchrun, RANK / WORLD_SIZE pick the share.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _predict(checkpoint, export, sharded, *opts) in (0, 1)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for k in range(2):
        assert all(shard_of(r["path"], 2) == k for r in _rows(sharded / f"shard-{k}-of-2"))
    assert main(["merge", str(sharded)]) == 1
    a, b = _rows(whole), _rows(sharded)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for col, va in ra.items():
            if va and (col in LABELS or col.startswith(("global_", "local_"))):
                assert math.isclose(float(va), float(rb[col]), abs_tol=1e-5), (ra["path"], col)
            else:
                assert va == rb[col], (ra["path"], col)
    merged = json.loads((sharded / "manifest.json").read_text())
    assert merged["complete"] and len(merged["merged_from"]) == 2 and merged["counts"]["ok"] == 5

    # A missing share: merge refuses and names it.
    import shutil

    shutil.rmtree(sharded / "shard-1-of-2")
    capsys.readouterr()
    assert main(["merge", str(sharded)]) == 2
    assert "missing shares 1/2" in capsys.readouterr().err


# ---------------------------------------------------------------------- usage errors: exit 2, nothing done

def test_usage_errors_exit_2_before_any_output(checkpoint, other_checkpoint, export, tmp_path, capsys):
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert _predict(tmp_path / "missing.pt", export, out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _predict(corrupt, export, out) == 2
    assert "corrupt" in capsys.readouterr().err
    # A stage I / II checkpoint: its fusion head is untrained, so its probabilities would be noise.
    ckpt = torch.load(checkpoint, weights_only=True)
    for stage in ("global", "local"):
        early = tmp_path / f"{stage}.pt"
        torch.save({**ckpt, "stage": stage}, early)
        assert _predict(early, export, out) == 2
        assert "fusion head is untrained" in capsys.readouterr().err
    assert not out.exists()
    assert _predict(checkpoint, tmp_path / "no-such-input", out) == 2
    assert "--input" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert _predict(checkpoint, export, tmp_path / "a-file") == 2
    assert "not a folder" in capsys.readouterr().err
    assert not out.exists()
    for bad in (["--shard", "2/2"], ["--no-such-option"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            _predict(checkpoint, export, out, *bad)
        assert e.value.code == 2
    assert not out.exists()


def test_resume_with_another_checkpoint_or_options_is_refused(checkpoint, other_checkpoint, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    write_dicom(inp / "a.dcm", _image(64, 64, 1))
    out = tmp_path / "out"
    assert _predict(checkpoint, inp, out) == 0
    before = (out / "predictions.jsonl").read_bytes()
    assert _predict(other_checkpoint, inp, out) == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert _predict(checkpoint, inp, out, "--all-branches") == 2
    assert "--all-branches" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == before


# ---------------------------------------------------------------------- kill -9 and resume

_SLOW_RUNNER = """
import sys, time
import agcnn.predict as p
append = p.Journal.append
def slow(self, rows):
    append(self, rows)
    time.sleep(0.25)  # room for the test to kill the process between batches
p.Journal.append = slow
from agcnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_resume_gives_exactly_one_row_per_file(checkpoint, tmp_path):
    inp = tmp_path / "in"
    for i in range(12):
        sub = inp / f"p{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        write_dicom(sub / f"IM{i:03d}", _image(64 + i, 64, i))
    (inp / "notes.txt").write_text("not an image")
    n_files = 13
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--workers", "0", "--batch-size", "2"]

    clean = tmp_path / "clean"
    assert main([*args, "--output", str(clean)]) == 0
    reference = _by_path(_rows(clean))

    out = tmp_path / "killed"
    runner = tmp_path / "runner.py"
    runner.write_text(_SLOW_RUNNER)
    journal = out / "predictions.jsonl"
    proc = subprocess.Popen([sys.executable, str(runner), *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
                break
            if proc.poll() is not None:
                pytest.fail("the predict process ended before it could be killed")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = [json.loads(x)["path"] for x in journal.read_text().splitlines()]
    assert 4 <= len(done_before) < n_files
    assert not (out / "predictions.csv").exists()
    # A kill in the middle of a write leaves a partial last line: it must not count as a result.
    with open(journal, "ab") as f:
        f.write(b'{"path":"p0/IM000","status":"ok","Atelec')

    assert main([*args, "--output", str(out)]) == 0
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(reference)
    assert len(rows) == len({r["path"] for r in rows}) == n_files
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == n_files and all(json.loads(x) for x in lines)
    by = _by_path(rows)
    for path in done_before:  # computed in the same batches as the clean run: identical
        assert all(by[path][c] == reference[path][c] for c in LABELS), path
    for path, ref in reference.items():
        for c in LABELS:
            if ref[c]:
                assert math.isclose(float(by[path][c]), float(ref[c]), abs_tol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_rows"] == len(done_before) and manifest["rows_this_run"] == n_files - len(done_before)


def test_a_decoder_crash_fails_one_file_not_the_run(checkpoint, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(7):
        write_dicom(inp / f"IM{i}.dcm", _image(64, 64, i))
    real = readers.read_image_with_info

    def read(path, **kw):
        # A codec segfault: the worker process dies without a Python exception.
        if os.path.basename(path) == "IM3.dcm" and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, **kw)

    monkeypatch.setattr(readers, "read_image_with_info", read)
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
               "--workers", "2", "--batch-size", "2"])
    assert rc == 1
    rows = _by_path(_rows(out))
    assert sorted(rows) == [f"IM{i}.dcm" for i in range(7)]
    assert rows["IM3.dcm"]["status"] == "failed" and "crashed" in rows["IM3.dcm"]["reason"]
    assert all(r["status"] == "ok" for p, r in rows.items() if p != "IM3.dcm")


def test_more_workers_than_cores_are_capped_said_once_and_recorded(checkpoint, tmp_path, monkeypatch, caplog):
    import logging

    from agcnn import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "_CAPPED", set())
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_dicom(inp / f"IM{i}.dcm", _image(64, 64, i))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="agcnn.runtime"):
        rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
                   "--workers", "64", "--batch-size", "2"])
    assert rc == 0 and len(_rows(out)) == 3
    assert [r.getMessage() for r in caplog.records] == ["--workers=64 capped at 1: the CPU cores this process may use"]
    assert json.loads((out / "manifest.json").read_text())["arguments"]["workers"] == 1


def test_a_limited_run_predicts_that_many_files_and_the_next_run_goes_on(checkpoint, tmp_path):
    from agcnn.errors import UsageError
    from agcnn.predict import PredictOptions, predict

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(5):
        write_dicom(inp / f"IM{i}.dcm", _image(64, 64, i))
    out = tmp_path / "out"
    lefts, rows = [], []
    for _ in range(3):
        summary = predict(PredictOptions(checkpoint, inp, out, workers=0, batch_size=2, progress=False, limit=2))
        lefts.append(summary.left)
        rows.append(len(_rows(out)))
        complete = json.loads((out / "manifest.json").read_text())["complete"]
    assert lefts == [3, 1, 0] and rows == [2, 4, 5] and complete
    assert sorted(_by_path(_rows(out))) == [f"IM{i}.dcm" for i in range(5)]
    with pytest.raises(UsageError, match="limit 0 must be at least 1"):
        predict(PredictOptions(checkpoint, inp, out, limit=0))


def test_a_file_is_listed_under_its_real_name_not_a_link_that_sorts_first(tmp_path):
    from agcnn.predict import list_files

    (tmp_path / "z_real" / "deep").mkdir(parents=True)
    (tmp_path / "z_real" / "f.png").write_bytes(b"x")
    (tmp_path / "z_real" / "deep" / "g.png").write_bytes(b"y")
    (tmp_path / "a_link").symlink_to(tmp_path / "z_real")
    (tmp_path / "b_link").symlink_to(tmp_path / "z_real" / "deep")
    listing = list_files(tmp_path)
    assert listing.paths == ["z_real/deep/g.png", "z_real/f.png"]
    assert listing.loops == 2


def test_rows_of_a_batch_take_the_probabilities_of_the_usable_records_in_order():
    from agcnn.predict import build_rows, columns_for
    from agcnn.predict.rows import BatchProbabilities

    labels = ["A", "B"]
    columns = columns_for(labels, identifiers=False, all_branches=True, calls=True)
    records = [
        {"path": "bad.dcm", "status": "failed", "reason": "truncated: ends early"},
        {"path": "one.png", "status": "ok", "reason": "", "format": "png", "height": 100, "width": 200, "notes": ""},
        {"path": "two.dcm", "status": "ok", "reason": "", "format": "dicom", "height": 50, "width": 50,
         "sop_instance_uid": "1.2.3", "notes": "MONOCHROME1 inverted", "PatientID": "not a column here"},
    ]
    probs = BatchProbabilities(
        fusion=torch.tensor([[0.25, 0.75], [0.5, 0.125]]),
        global_=torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        local=torch.tensor([[0.6, 0.7], [0.8, 0.9]]),
        boxes=torch.tensor([[0, 0, 32, 32], [8, 8, 16, 24]]),
    )
    geometry = Geometry(resize=32, image_size=32, highres_size=32)
    rows = build_rows(records, probs, columns=columns, labels=labels, geometry=geometry,
                      thresholds=torch.tensor([0.5, float("nan")]), all_branches=True)
    assert [r["path"] for r in rows] == ["bad.dcm", "one.png", "two.dcm"]
    assert all(list(r) == columns for r in rows)
    bad, one, two = rows
    assert bad["status"] == "failed" and bad["A"] is None and bad["box_x0"] is None and bad["call_A"] is None
    assert (one["A"], one["B"], two["A"], two["B"]) == (0.25, 0.75, 0.5, 0.125)
    assert (two["global_B"], two["local_A"]) == (0.4, 0.8)
    assert (one["call_A"], two["call_A"], one["call_B"]) == (0, 1, None)  # NaN: no operating point
    assert [one[c] for c in ("box_x0", "box_y0", "box_x1", "box_y1")] == [0, 0, 200, 100]
    assert [two[c] for c in ("box_x0", "box_y0", "box_x1", "box_y1")] == [12, 12, 25, 38]
    assert two["sop_instance_uid"] == "1.2.3" and two["notes"] == "MONOCHROME1 inverted" and "PatientID" not in two
    assert build_rows(records[:1], None, columns=columns, labels=labels, geometry=geometry)[0]["status"] == "failed"
