"""Two CPU processes on gloo through torchrun: DistributedDataParallel training of the global stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agcnn.checkpoint import load_checkpoint
from agcnn.data.synthetic import generate_phantoms


def _phantom_config(tmp_path: Path, tiny_config, *overrides: str) -> Path:
    """A 40-phantom set and a tiny config on it, written to ``tmp_path / "c.yaml"``."""
    root = tmp_path / "phantoms"
    generate_phantoms(root, count=40, size=64, seed=0, workers=1)
    path = tmp_path / "c.yaml"
    tiny_config("data.synthetic_count=40", "data.synthetic_size=64", f"data.root={root}", *overrides).dump(path)
    return path


def _torchrun_train(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``agcnn train`` in two CPU processes; fails the test, with the output, unless it succeeds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--module", "agcnn",
           "train", "--config", str(config), "--no-progress", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(args) + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_gloo_run_trains_and_writes_once(tmp_path, tiny_config):
    out = tmp_path / "run"
    proc = _torchrun_train(_phantom_config(tmp_path, tiny_config), "--stage", "global", "--out", str(out))
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
    # Each process drew its own augmentation: rank 1's RNG state differs from rank 0's.
    assert len(ckpt["rng_other_ranks"]) == 1
    assert not torch.equal(ckpt["rng_other_ranks"][0]["torch"], ckpt["rng"]["torch"])
    assert ckpt["split"]["runs"][ckpt["split"]["current"]]["train"]["images"] == 28


@pytest.mark.slow
def test_two_process_fusion_stage_trains_the_head_alone(tmp_path, tiny_config):
    """Stage III under torchrun: the paper's (images through the frozen branches every epoch, the
    head alone in DDP, the 15th output) and the cached one (features gathered as tensors)."""
    config = _phantom_config(tmp_path, tiny_config, "model.no_finding=true")
    runs = {
        "paper": ["--out", str(tmp_path / "run"), "--set", "train.cache_fusion_features=false",
                  "--set", "train.fusion_from_global=false"],
        "cached": ["--out", str(tmp_path / "cached"), "--stage", "fusion", "--seed-from",
                   str(tmp_path / "run" / "local" / "best.pt"), "--set", "train.cache_fusion_features=true"],
    }
    for name, extra in runs.items():
        proc = _torchrun_train(config, *extra)
        assert ("cached pool5 features" in proc.stdout) == (name == "cached")
        out = Path(extra[1]) / "fusion"
        ckpt = load_checkpoint(out / "best.pt")
        # Validation probabilities of all 8 validation images were gathered from both processes.
        assert len(ckpt["val_auc"]["fusion"]) == 14 and ckpt["model"]["fusion.weight"].shape[0] == 15
        seed = load_checkpoint(tmp_path / "run" / "local" / "best.pt")["model"]
        for key, value in ckpt["model"].items():
            assert torch.equal(value, seed[key]) != key.startswith("fusion."), (name, key)


@pytest.mark.slow
def test_two_process_local_stage_on_cached_crops(tmp_path, tiny_config):
    """Stage II under torchrun with train.cache_local_crops: each process crops its share, the
    crops are gathered in dataset order, the local branch alone is wrapped in DDP (the run
    checks at the end of each stage that both replicas hold the same weights)."""
    out = tmp_path / "run"
    config = _phantom_config(tmp_path, tiny_config, "train.cache_local_crops=true")
    proc = _torchrun_train(config, "--stage", "all", "--out", str(out))
    assert proc.stdout.count("local: cached the attended crops of 28 training and") == 1
    g = load_checkpoint(out / "global" / "best.pt")["model"]
    loc = load_checkpoint(out / "local" / "last.pt")
    # 28 training images, 2 per process per step: 7 steps; the global branch untouched.
    assert loc["step"] == 7
    for key, value in loc["model"].items():
        if not key.startswith("fusion."):
            assert torch.equal(value, g[key]) == key.startswith("global_branch."), key
