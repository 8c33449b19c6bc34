"""Where a stage starts: the random seeds, the checkpoint that seeds it, or the last.pt it
resumes from.

Random state. The sampler order and the loader workers' seeds of an epoch depend on
(``train.seed``, epoch) only; each process draws its own augmentation (:func:`rank_seed`); every
RNG the loop touches is saved in last.pt (:func:`rng_state`) and restored on resume, so a
resumed run trains to the same weights as an uninterrupted one.

Start points. A stage is resumed from ``RUN_DIR/<stage>/last.pt`` (``--resume``), seeded from
``--seed-from CKPT`` or from ``RUN_DIR/<previous stage>/best.pt`` as its row in
:data:`agcnn.stages.STAGE_TABLE` says, or -- the first stage -- starts new. A seed checkpoint
that is missing is an error naming the file and the stage to run first, never a silent start
from random weights; one trained with another model or input size is refused.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agcnn.checkpoint import load_checkpoint
from agcnn.config import Config
from agcnn.errors import CheckpointError, ConfigError
from agcnn.labels import check_labels
from agcnn.runtime import Runtime
from agcnn.stages import Stage, stage_plan
from agcnn.train.context import TrainContext

# ---------------------------------------------------------------------- random state


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random from the worker's torch seed (itself from the loader's generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of one process: ``train.seed`` on rank 0 (so a single process draws
    as before) and a different one on every other rank. The DistributedSampler keeps the shared
    ``train.seed``, so the partition of the data is the same; only the random crops and flips
    differ, as they would on one GPU that saw the whole batch."""
    return seed + 1_000_003 * rank


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The sampler order and worker seeds of one epoch depend on (seed, epoch) only, so a resumed
    run draws the same batches as an uninterrupted one."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return g


def restore_rng(ckpt: dict[str, Any], rt: Runtime, seed: int) -> None:
    """This process's random state from a resumed last.pt (each rank continues its own draws)."""
    rng = ckpt["rng"]
    if rt.rank:
        others = ckpt.get("rng_other_ranks") or []
        rng = others[rt.rank - 1] if len(others) >= rt.rank else None
    if rng is not None:
        set_rng_state(rng)
    else:  # resumed with more processes than wrote the checkpoint
        seed_everything(rank_seed(seed + int(ckpt["epoch"]), rt.rank))


# ---------------------------------------------------------------------- start points


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage


def resumes(ctx: TrainContext, stage: str) -> bool:
    """The stage continues from its last.pt (``--resume`` and the file is there)."""
    return ctx.resume and (stage_dir(ctx.run_dir, stage) / "last.pt").is_file()


def check_start_points(ctx: TrainContext, stages: tuple[str, ...] | list[str]) -> None:
    """Before any data is loaded: no stage would overwrite a run, and the first stage's start
    (its seed checkpoint, or the ImageNet weights of a new model) exists."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    if not ctx.resume:
        for s in stages:
            if (stage_dir(run_dir, s) / "last.pt").exists():
                raise ConfigError(f"{str(stage_dir(run_dir, s) / 'last.pt')!r} already exists; pass --resume to continue "
                                  f"that run, or choose a new --out")
    first = stage_plan(stages[0], cfg.train.finetune_all)
    if resumes(ctx, first.name):
        return
    if ctx.seed_from is not None:
        check_seed_exists(Path(ctx.seed_from), first, explicit=True)
    elif first.seed_from is not None:
        check_seed_exists(stage_dir(run_dir, first.seed_from) / "best.pt", first, explicit=False)
    else:
        # Only a stage that starts from scratch reads its start weights: model.pretrained must
        # name them, and the file be here (ImageNet weights fetched into torch hub's cache).
        from agcnn.models.backbones import check_start_weights

        check_start_weights(cfg.model)


# What only the local branch's input depends on: a checkpoint of the global stage, whose local
# branch never trained, may seed or resume a run that changes them (the local stage of
# `agcnn demo --control-same-resolution` from the global stage of a `--long` run).
LOCAL_INPUT = ("model.local_size", "data.highres_size")


def _model_signature(cfg_dict: dict[str, Any], stage: str | None = None) -> dict[str, Any]:
    """The config values a seed or resumed checkpoint of ``stage`` must share: the model (but
    where its ImageNet start came from) and the input geometry the weights were trained at."""
    sig = {f"model.{k}": v for k, v in cfg_dict["model"].items() if k != "pretrained"}
    data = cfg_dict["data"]
    sig.update({f"data.{k}": data.get(k) for k in ("image_size", "resize", "highres_size")})
    if stage == "global":
        sig = {k: v for k, v in sig.items() if k not in LOCAL_INPUT}
    return sig


def check_seed_exists(path: Path, stage: Stage, explicit: bool) -> None:
    """A stage never trains on from random weights because its seed checkpoint is missing."""
    if path.is_file():
        return
    if explicit:
        raise CheckpointError(f"--seed-from checkpoint {str(path)!r} does not exist; pass an existing best.pt or last.pt")
    raise CheckpointError(
        f"the {stage.name} stage starts from {str(path)!r}, which does not exist: run the {stage.seed_from} stage "
        f"first (agcnn train --stage {stage.seed_from} --out {path.parent.parent}), or pass --seed-from CKPT"
    )


def check_same_model(ckpt: dict[str, Any], cfg: Config, where: str) -> None:
    """The checkpoint was trained with this config's model, label list and input sizes."""
    check_labels(ckpt["labels"], cfg.labels, where=where)
    # Through Config: a checkpoint written before a setting existed has that setting's default.
    stage = ckpt.get("stage")
    mine, theirs = _model_signature(cfg.to_dict(), stage), _model_signature(Config.from_dict(ckpt["config"]).to_dict(), stage)
    if mine != theirs:
        diff = [f"{k}: {theirs[k]!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v]
        raise ConfigError(f"checkpoint {where} was trained with different settings ({'; '.join(diff)}); "
                          f"use the same model and input sizes as the run that wrote it")


def load_seed(model: nn.Module, path: Path, cfg: Config, stage: Stage, explicit: bool) -> dict[str, Any]:
    """Initialise ``model`` from the checkpoint that seeds ``stage``; a missing one is fatal."""
    check_seed_exists(path, stage, explicit)
    ckpt = load_checkpoint(path)
    check_same_model(ckpt, cfg, f"seed checkpoint {str(path)!r}")
    model.load_state_dict(ckpt["model"])
    return ckpt


def load_resumed(model: nn.Module, path: Path, cfg: Config, stage: str) -> dict[str, Any]:
    """Initialise ``model`` from the stage's own last.pt; the checkpoint, for the rest of its state."""
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != stage:
        raise CheckpointError(f"{str(path)!r} belongs to stage {ckpt.get('stage')!r}, not {stage!r}")
    check_same_model(ckpt, cfg, f"{str(path)!r} (resumed)")
    model.load_state_dict(ckpt["model"])
    return ckpt


def load_start(model: nn.Module, plan: Stage, ctx: TrainContext) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Load the stage's start into ``model``: (the resumed last.pt, the seed checkpoint), at most
    one of them; (None, None) for a stage that starts new."""
    last_path = stage_dir(ctx.run_dir, plan.name) / "last.pt"
    if resumes(ctx, plan.name):
        return load_resumed(model, last_path, ctx.cfg, plan.name), None
    if last_path.exists() and not ctx.resume:
        raise ConfigError(f"{str(last_path)!r} already exists; pass --resume to continue that run, or choose a new --out")
    if ctx.seed_from is not None:
        return None, load_seed(model, Path(ctx.seed_from), ctx.cfg, plan, explicit=True)
    if plan.seed_from is not None:
        return None, load_seed(model, stage_dir(ctx.run_dir, plan.seed_from) / "best.pt", ctx.cfg, plan, explicit=False)
    return None, None
