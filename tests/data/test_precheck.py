"""The data pre-check: every row's file exists and starts like an image, checked before the first
step; problems listed at once (exit 2), or left out and counted with data.skip_unreadable."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.checkpoint import load_checkpoint
from agcnn.cli import main
from agcnn.config import Config
from agcnn.data.datasets import ImageLoadError, XrayDataset, build_datasets
from agcnn.data.precheck import SHOWN, UnreadableImagesError, check_datasets, find_problems
from agcnn.data.readers import check_header
from agcnn.labels import LABELS

HTML = b"<!DOCTYPE html>\n<html><head><title>Session expired</title></head><body>Please log in</body></html>\n"


def _png(path, seed=0):
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (40, 40), dtype=np.uint8))


def test_headers_of_each_kind(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    (tmp_path / "c.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 8)
    # No preamble: implicit VR little endian, first element (0008,0005) with an even length.
    (tmp_path / "d.dcm").write_bytes(b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100")
    assert [check_header(tmp_path / n) for n in ("a.png", "b.jpg", "c.dcm", "d.dcm")] == ["png", "jpeg", "dicom", "dicom"]


def _table_dataset(tmp_path, files: dict[str, bytes | None], name="train"):
    for f, content in files.items():
        if content is None:
            _png(tmp_path / f)
        elif content != b"MISSING":
            (tmp_path / f).write_bytes(content)
    table = pd.DataFrame({"path": list(files), "Nodule": [0.0] * len(files)})
    return XrayDataset(table, ["Nodule"], root=tmp_path, name=name)


def test_every_problem_is_found_with_its_row_and_reason(tmp_path):
    ds = _table_dataset(tmp_path, {"ok.png": None, "page.png": HTML, "gone.png": b"MISSING", "empty.png": b"", "ok2.png": None})
    problems = find_problems(ds)
    assert [(p.row, p.path, p.reason) for p in problems] == [
        (1, "page.png", "not_an_image"), (2, "gone.png", "unreadable"), (3, "empty.png", "empty_file")]
    assert "HTML" in problems[0].message and "not found" in problems[1].message
    with pytest.raises(UnreadableImagesError) as info:
        check_datasets({"train": ds})
    msg = str(info.value)
    assert msg.startswith("3 of 5 images in the data table cannot be used:")
    assert "'page.png' (row 1 of the train set)" in msg and "data.skip_unreadable=true" in msg
    assert info.value.exit_code == 2


def test_long_listings_are_bounded(tmp_path):
    files = {f"{i}.png": HTML for i in range(SHOWN + 7)}
    with pytest.raises(UnreadableImagesError, match=r"\.\.\. and 7 more") as info:
        check_datasets({"train": _table_dataset(tmp_path, files)})
    assert str(info.value).count("\n  '") == SHOWN


def test_skip_unreadable_leaves_the_rows_out(tmp_path):
    ds = _table_dataset(tmp_path, {"ok.png": None, "page.png": HTML, "ok2.png": None})
    out, problems, checked = check_datasets({"train": ds, "other": torch.utils.data.TensorDataset(torch.zeros(2))},
                                            skip_unreadable=True)
    assert checked == 3 and [p.path for p in problems] == ["page.png"]
    assert out["train"].paths == ["ok.png", "ok2.png"] and len(out["other"]) == 2


def test_a_worker_failure_is_one_line_naming_file_and_row(tmp_path):
    ds = _table_dataset(tmp_path, {"ok.png": None, "cut.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 30})
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith("cannot read image 'cut.png' (row 1 of the train set")


# ---------------------------------------------------------------------- through `agcnn train`

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=32", "data.highres_size=32",
    "data.num_workers=0", "train.device=cpu", "train.channels_last=false", "train.global.batch_size=4",
    "train.global.epochs=1", "data.dataset=csv",
]


def _csv_set(root, bad: dict[str, bytes]):
    """A table of 12 noise PNGs (8 train, 4 val) plus the ``bad`` files, listed as training rows."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(12):
        _png(root / "img" / f"{i}.png", seed=i)
        rows.append({"path": f"img/{i}.png", "patient": f"P{i}", "split": "train" if i < 8 else "val",
                     **{n: float((i + k) % 2) for k, n in enumerate(LABELS)}})
    for name, content in bad.items():
        (root / "img" / name).write_bytes(content)
        rows.append({**rows[0], "path": f"img/{name}", "patient": f"B{name}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def test_train_refuses_an_html_page_saved_as_png_before_training(tmp_path, capsys):
    _csv_set(tmp_path / "data", {"page.png": HTML})
    cfg = tmp_path / "c.yaml"
    Config.load(None, [*TINY, f"data.root={tmp_path / 'data'}"]).dump(cfg)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--stage", "global", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agcnn train: error: 1 of 13 images in the data table cannot be used:")
    assert "'img/page.png' (row 8 of the train set)" in err and "HTML" in err and "Traceback" not in err
    assert not run.exists()  # refused before anything was written or trained


def test_skip_unreadable_trains_without_them_and_counts_them(tmp_path, capsys):
    # page.png: refused by its header; cut.png: a valid header, fails when decoded.
    _csv_set(tmp_path / "data", {"page.png": HTML, "cut.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40})
    cfg = Config.load(None, [*TINY, f"data.root={tmp_path / 'data'}", "data.skip_unreadable=true"])
    from agcnn.train.loop import train

    lines: list[str] = []
    train(cfg, tmp_path / "run", ["global"], progress=False, say=lines.append)
    assert any("1 left out (data.skip_unreadable)" in line for line in lines)
    ckpt = load_checkpoint(tmp_path / "run" / "global" / "last.pt")
    # Counted, not listed: a PACS path may hold a patient's name.
    assert ckpt["left_out"] == [{"split": "train", "reason": "not_an_image", "files": 1}]
    assert ckpt["history"][0]["skipped_images"] == 1  # cut.png, once in the epoch
    log = pd.read_csv(tmp_path / "run" / "global" / "log.csv")
    assert log["skipped_images"].tolist() == [1]


def test_without_skip_a_file_that_fails_to_decode_stops_with_one_line(tmp_path, capsys):
    _csv_set(tmp_path / "data", {"cut.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40})
    cfg = tmp_path / "c.yaml"
    Config.load(None, [*TINY, f"data.root={tmp_path / 'data'}"]).dump(cfg)
    assert main(["train", "--config", str(cfg), "--stage", "global", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agcnn train: error: cannot read image 'img/cut.png' (row 8 of the train set")


def test_build_datasets_carries_skip_unreadable(tmp_path):
    _csv_set(tmp_path / "data", {})
    cfg = Config.load(None, [*TINY, f"data.root={tmp_path / 'data'}", "data.skip_unreadable=true"])
    assert build_datasets(cfg, splits=("train",))["train"].skip_unreadable


def test_evaluate_reports_a_skip_unreadable_dataset_s_failures_like_any_other(tmp_path):
    from agcnn.evaluate import predict_split

    ds = _table_dataset(tmp_path, {"ok.png": None, "cut.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 30})
    ds.transform = lambda x: x.expand(3, -1, -1)
    seen = []

    class Probe(torch.nn.Module):
        """Counts the images that reach the model."""

        def forward(self, x, stage):
            seen.append(len(x))
            return types.SimpleNamespace(logits=lambda branch: torch.zeros(len(x), 1))

    for skip in (True, False):  # handed back by the dataset, or raised by it: the same record
        ds.skip_unreadable = skip
        seen.clear()
        probs, labels, rows, unreadable = predict_split(Probe(), ds, ["global"], device=torch.device("cpu"),
                                                        batch_size=2, num_workers=0)
        assert seen == [1] and rows.tolist() == [0] and probs["global"].shape == labels.shape == (1, 1)
        ((row, message),) = unreadable
        assert row == 1 and "'cut.png' (row 1 of the train set" in message


def test_with_a_cache_the_rows_prepare_could_not_decode_are_the_problems(tmp_path):
    from agcnn.data.cache import ImageCache, build_cache

    ds = _table_dataset(tmp_path, {"ok.png": None, "cut.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 30})
    build_cache(tmp_path / "cache", ds.paths, tmp_path, size=16, workers=0)
    cache = ImageCache(tmp_path / "cache")
    cached = XrayDataset(ds.table, ["Nodule"], root=tmp_path, cache=cache, cache_rows=cache.verify(ds.paths, tmp_path), name="train")
    (problem,) = find_problems(cached)
    assert (problem.row, problem.path, problem.reason) == (1, "cut.png", "unusable_in_cache")
    assert "recorded by agcnn prepare" in problem.message


def test_dicom_headers_are_checked_for_modality_and_scope(tmp_path):
    from agcnn.data.dicom_write import write_dicom
    from agcnn.data.scope import ScopePolicy

    pixels = np.arange(48 * 40, dtype=np.uint16).reshape(48, 40)
    write_dicom(tmp_path / "pa.dcm", pixels, modality="DX", BodyPartExamined="CHEST", ViewPosition="PA")
    write_dicom(tmp_path / "lat.dcm", pixels, modality="DX", BodyPartExamined="CHEST", ViewPosition="LL")
    write_dicom(tmp_path / "hip.dcm", pixels, modality="CR", BodyPartExamined="HIP", ViewPosition="AP")
    write_dicom(tmp_path / "ct.dcm", pixels, modality="CT")
    table = pd.DataFrame({"path": ["pa.dcm", "lat.dcm", "hip.dcm", "ct.dcm"], "Nodule": 0.0})
    ds = XrayDataset(table, ["Nodule"], root=tmp_path, name="train", scope=ScopePolicy())
    found = {p.path: (p.reason, p.message) for p in find_problems(ds)}
    assert set(found) == {"lat.dcm", "hip.dcm", "ct.dcm"}
    assert found["lat.dcm"][0] == "not_frontal" and "data.any_view: true trains on it anyway" in found["lat.dcm"][1]
    assert found["hip.dcm"][0] == "out_of_scope" and found["ct.dcm"][0] == "unsupported_modality"
    # Switched off, only the modality is left; without a scope policy the same.
    ds.scope = ScopePolicy(any_body_part=True, any_view=True)
    assert [p.path for p in find_problems(ds)] == ["ct.dcm"]
