"""What training reads and what it feeds the model.

Training never opens a file of the test split: every file it opens is watched.

``agcnn train`` runs in a subprocess with an audit hook (``sys.addaudithook``) on the ``open``
event, which every read of an image goes through (``agcnn.data.readers`` reads the bytes with
``open`` and decodes them in memory; ``pydicom`` and the table readers open files the same way).
The loader runs in the process (``data.num_workers=0``), so no read escapes into a worker. As a
control, ``agcnn evaluate --split test`` under the same hook must open the test images: a hook
that saw nothing would otherwise pass.

Stage III trains on augmented images unless it trains on cached features: every input of the
model is caught by a module forward hook and compared with the evaluation-transform images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from agcnn.config import Config
from agcnn.labels import LABELS

WATCH = r"""
import json, os, sys
opened = []

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))

sys.addaudithook(hook)
from agcnn.cli import main
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "opened": opened}, f)
"""

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=32", "data.highres_size=48",
    "data.num_workers=0", "train.device=cpu", "train.channels_last=false", "train.global.batch_size=8",
    "train.local.batch_size=8", "train.fusion.batch_size=8", "train.global.epochs=1", "train.local.epochs=1",
    "train.fusion.epochs=1", "train.bootstrap=0", "data.dataset=csv", "data.augment=resized_crop",
]


def image_set(root: Path, n_train: int = 24, n_val: int = 8, n_test: int = 8) -> list[dict]:
    """Noise PNGs in ``root/img`` and ``root/labels.csv``; returns the rows."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_val + n_test):
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        name = f"{split}_{i}.png"
        cv2.imwrite(str(root / "img" / name), np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8))
        rows.append({"path": f"img/{name}", "patient": f"p{i // 2}", "split": split,
                     **{n: str((i + k) % 2) for k, n in enumerate(LABELS)}})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return rows


def watched(tmp_path: Path, name: str, *argv: str) -> set[str]:
    """The real paths of every file ``agcnn ARGV`` opened; fails the test unless it exits 0."""
    log = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WATCH, str(log), *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and log.is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(log.read_text())
    assert result["rc"] == 0
    return set(result["opened"])


@pytest.mark.parametrize("extra", [[], ["train.cache_local_crops=true", "train.cache_fusion_features=false",
                                        "train.local_from_global=true"]], ids=["default", "cached-crops"])
def test_training_opens_no_file_of_the_test_split(tmp_path, extra):
    data = tmp_path / "data"
    rows = image_set(data)
    cfg = tmp_path / "c.yaml"
    Config.load(None, [*TINY, f"data.root={data}", *[f"{e}" for e in extra]]).dump(cfg)
    files = {s: {os.path.realpath(data / r["path"]) for r in rows if r["split"] == s} for s in ("train", "val", "test")}

    run = tmp_path / "run"
    opened = watched(tmp_path, "train", "train", "--config", str(cfg), "--out", str(run), "--no-progress")
    assert (run / "fusion" / "best.pt").is_file()
    # The hook saw the image reads: every training and validation image was opened ...
    assert files["train"] <= opened and files["val"] <= opened
    # ... and no test image, in any of the three stages.
    assert not opened & files["test"], sorted(opened & files["test"])

    # Control: evaluating the test split under the same hook opens every test image.
    opened = watched(tmp_path, "evaluate", "evaluate", "--checkpoint", str(run / "fusion" / "best.pt"), "--split",
                     "test", "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--no-roc")
    assert files["test"] <= opened


@pytest.mark.parametrize("cached", [False, True], ids=["paper", "cached-features"])
def test_stage_three_trains_on_augmented_images_unless_on_cached_features(tmp_path, cached, one_thread):
    import torch

    from agcnn.data.datasets import build_datasets
    from agcnn.data.transforms import transforms_from_config
    from agcnn.models import AGCNN
    from agcnn.train.loop import train

    data = tmp_path / "data"
    image_set(data)
    cfg = Config.load(None, [*TINY, f"data.root={data}", f"train.cache_fusion_features={str(cached).lower()}"])
    run = tmp_path / "run"
    train(cfg, run, ["global", "local"], progress=False, say=lambda _m: None)
    seen: list[torch.Tensor] = []

    def catch(module, args):
        if isinstance(module, AGCNN):
            seen.append(args[0].detach().float().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(catch)
    try:
        train(cfg, tmp_path / "fusion", ["fusion"], seed_from=run / "local" / "best.pt", progress=False,
              say=lambda _m: None)
    finally:
        handle.remove()
    rows = torch.cat(seen).flatten(1)
    plain = build_datasets(cfg, splits=("train", "val"))
    plain["train"].transform = transforms_from_config(cfg.data, train=False)
    ref = {s: torch.stack([plain[s][i]["image"] for i in range(len(plain[s]))]).flatten(1) for s in ("train", "val")}

    def matching(split: str) -> int:
        # Distances of ~85 between differing images; cdist's own rounding is ~0.03.
        return int((torch.cdist(rows, ref[split]).amin(1) < 1.0).sum())

    # The validation images go through the model as evaluated, in either mode ...
    assert matching("val") == 8
    # ... and the 24 training images once per epoch: augmented (none equals its plain image), or,
    # for cached features, plain, computed once by the frozen branches.
    assert len(rows) == 24 + 8
    assert matching("train") == (24 if cached else 0)
