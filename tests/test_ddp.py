"""Two CPU processes on gloo through torchrun: DistributedDataParallel training of the global stage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agcnn.checkpoint import load_checkpoint
from agcnn.data.synthetic import generate_phantoms

@pytest.mark.slow
def test_two_process_gloo_run_trains_and_writes_once(tmp_path, tiny_config):
    root = tmp_path / "phantoms"
    generate_phantoms(root, count=40, size=64, seed=0, workers=1)
    cfg = tiny_config("data.synthetic_count=40", "data.synthetic_size=64", f"data.root={root}")
    cfg.dump(tmp_path / "c.yaml")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--module", "agcnn",
           "train", "--config", str(tmp_path / "c.yaml"), "--stage", "global", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 alone printed and wrote: one summary line, one checkpoint pair, no stray temporaries.
    assert proc.stdout.count("global epoch 1/1") == 1
    files = sorted(p.name for p in (out / "global").iterdir())
    assert files == ["best.pt", "last.pt", "log.csv"]
    ckpt = load_checkpoint(out / "global" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["history"][0]["train_loss"] > 0
    # 28 training images, 2 per process per step, 14 per process: 7 steps.
    assert ckpt["step"] == 7
    # Replicas were compared at the end of the stage (train._check_replicas_agree); a mismatch
    # would have failed the run.
