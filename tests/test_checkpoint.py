from __future__ import annotations

import os
import pickle

import pytest
import torch

from agcnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from agcnn.labels import LabelMismatchError


def test_round_trip_rebuilds_model_from_checkpoint_alone(tmp_path, small_config):
    from agcnn.models import AGCNN

    cfg = small_config()
    model = AGCNN.from_config(cfg.model, 14, 64).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model_state=model.state_dict(), config=cfg, stage="fusion", epoch=3)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["labels"] == cfg.labels
    again, cfg2 = model_from_checkpoint(ckpt)
    assert cfg2.model.backbone == "resnet18"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).fusion_logits, model(x).fusion_logits)
    assert not list(tmp_path.glob(".*.tmp"))
    # Readable like any file written with open(), not 0600 like a raw mkstemp file.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an agcnn checkpoint"):
        load_checkpoint(foreign)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "agcnn-checkpoint", "payload": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_label_mismatch_detected(tmp_path, small_config):
    cfg = small_config()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model_state={}, config=cfg)
    ckpt = torch.load(path, weights_only=True)
    ckpt["labels"] = list(reversed(ckpt["labels"]))
    torch.save(ckpt, path)
    with pytest.raises(LabelMismatchError):
        load_checkpoint(path)
