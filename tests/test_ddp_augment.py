"""Under torchrun every process draws its own augmentation of the images it trains on.

Two CPU processes on gloo train the global stage on sixteen copies of one image (distinct files
and patients, identical pixels), so what the model receives differs between the processes only
through the random crops and flips. A forward hook in each process keeps every training input of
the model; processes seeded alike would feed the model the same tensors, step for step. With
loader workers (``num_workers=1``) the draws come from the workers' per-rank seeds
(``agcnn.train.seeds.rank_seed``), without them from the per-rank reseeding of the process in
``agcnn.train.stage.build_stage``: the test fails when either is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.config import Config
from agcnn.labels import LABELS

CATCH = r"""
import os, sys, torch
from agcnn.models import AGCNN
seen = []

def catch(module, args):
    if isinstance(module, AGCNN) and torch.is_grad_enabled():  # training steps, not validation
        seen.append(args[0].detach().cpu().clone())

torch.nn.modules.module.register_module_forward_pre_hook(catch)
from agcnn.cli import main
rc = main(sys.argv[2:])
torch.save(torch.cat(seen), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
sys.exit(rc)
"""

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=32", "data.highres_size=48",
    "train.device=cpu", "train.channels_last=false", "train.global.batch_size=4", "train.global.epochs=1",
    "data.dataset=csv", "data.augment=resized_crop", "data.crop_scale=[0.3,1.0]",
]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_each_process_draws_its_own_augmentation(tmp_path, workers):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    same = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    rows = []
    for i in range(24):
        split = "train" if i < 16 else "val"
        pixels = same if split == "train" else np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)
        cv2.imwrite(str(data / "img" / f"{i}.png"), pixels)
        rows.append({"path": f"img/{i}.png", "patient": f"p{i}", "split": split,
                     **{n: str((i + k) % 2) for k, n in enumerate(LABELS)}})
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    cfg = tmp_path / "c.yaml"
    Config.load(None, [*TINY, f"data.root={data}", f"data.num_workers={workers}"]).dump(cfg)
    script = tmp_path / "catch.py"
    script.write_text(CATCH)
    caught = tmp_path / "caught"
    caught.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(caught), "train", "--config", str(cfg), "--stage", "global", "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(caught / f"rank{r}.pt") for r in (0, 1))
    # 16 images, 2 per process per step: 8 inputs each.
    assert r0.shape == r1.shape and r0.shape[0] == 8
    # The same image, drawn differently: within a process ...
    assert all(not torch.allclose(r0[0], r0[k]) for k in range(1, 8))
    # ... and between the processes, at every step.
    assert all(not torch.allclose(a, b) for a, b in zip(r0, r1))
