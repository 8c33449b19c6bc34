"""One stage of the table, built: its model -- resumed, seeded, or new -- frozen as its row
says, on the device, with its optimizer and the source of its batches; and how far it has got.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from agcnn.checkpoint import trained_branches
from agcnn.config import Config, StageConfig
from agcnn.errors import ConfigError
from agcnn.runtime import Runtime
from agcnn.stages import Stage, apply_freezing, stage_plan
from agcnn.train.context import TrainContext
from agcnn.train.parallel import convert_sync_batchnorm
from agcnn.train.seeds import load_start, rank_seed, restore_rng, resumes, seed_everything, stage_dir
from agcnn.train.sources import BatchSource, make_source
from agcnn.train.step import build_optimizer, set_scheduled_lr


@dataclass
class StageResult:
    stage: str
    epochs: int
    best_metric: float
    best_epoch: int
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False


@dataclass
class StageRun:
    """One stage, built: its model and optimizer, where it writes, and how far it has got."""

    name: str
    plan: Stage
    ctx: TrainContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    out: Path  # RUN_DIR/<stage>
    epochs: int
    source: BatchSource | None = None  # None when the stage has nothing left to train
    start_epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_so_far: int = 0  # images the loader could not decode, counted up to the last epoch

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def rt(self) -> Runtime:
        return self.ctx.rt

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def result(self, skipped: bool = False) -> StageResult:
        epochs = self.start_epoch if skipped else self.epochs
        return StageResult(self.name, epochs, self.best_metric, self.best_epoch, self.best_path, self.last_path,
                           self.history, skipped=skipped)


@dataclass
class EpochStats:
    train_loss: float
    lr: float
    seconds: float
    images: int  # over every process

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def build_stage(ctx: TrainContext, stage_name: str, datasets: dict[str, Dataset]) -> StageRun:
    """The model of the stage -- resumed, seeded from the stage before, or new -- frozen as its
    row says, on the device, with its optimizer and the batches it trains on."""
    cfg, rt = ctx.cfg, ctx.rt
    plan = stage_plan(stage_name, cfg.train.finetune_all)
    sc = cfg.stage(stage_name)
    batch_size = process_batch_size(sc, stage_name, rt)
    if len(datasets.get("val", [])) == 0:
        raise ConfigError("the validation split is empty; the best checkpoint is chosen on it. Set data.val_fraction > 0 "
                          "or data.val_list")
    seed_everything(cfg.train.seed)
    model = new_model(cfg, seeded=resumes(ctx, stage_name) or ctx.seed_from is not None or plan.seed_from is not None)
    resume_ckpt, seed_ckpt = load_start(model, plan, ctx)
    if resume_ckpt is None:
        start_as_global(model, plan, cfg, seed_ckpt)
    place_model(model, plan, cfg, rt)
    if rt.rank:
        # Every process its own augmentation draws (rank 0 keeps train.seed); see rank_seed.
        seed_everything(rank_seed(cfg.train.seed, rt.rank))
    optimizer, scheduler = build_optimizer([p for p in model.parameters() if p.requires_grad], sc)
    run = StageRun(stage_name, plan, ctx, model, optimizer, scheduler, stage_dir(ctx.run_dir, stage_name), sc.epochs)
    if resume_ckpt is not None:
        restore(run, resume_ckpt)
        if run.start_epoch >= run.epochs:
            ctx.say(f"{stage_name}: already trained for {run.start_epoch} epoch(s) (train.{stage_name}.epochs={sc.epochs}); "
                    f"skipped")
            return run
        ctx.say(f"{stage_name}: resuming after epoch {run.start_epoch} from {run.last_path}")
    run.source = make_source(model, plan, ctx, datasets, batch_size)
    return run


def process_batch_size(sc: StageConfig, stage_name: str, rt: Runtime) -> int:
    """Each process's share of the stage's batch (``batch_size`` is the total over all of them)."""
    if sc.epochs < 1 or sc.batch_size < 1:
        raise ConfigError(f"train.{stage_name}.epochs ({sc.epochs}) and batch_size ({sc.batch_size}) must be at least 1")
    if sc.batch_size % rt.world:
        raise ConfigError(f"train.{stage_name}.batch_size={sc.batch_size} is the total over {rt.world} processes and must "
                          f"divide evenly; use a multiple of {rt.world}")
    return sc.batch_size // rt.world


def new_model(cfg: Config, *, seeded: bool) -> nn.Module:
    """The stage's AG-CNN before any checkpoint is loaded into it."""
    from agcnn.models import AGCNN

    model_cfg = cfg.model
    if seeded:
        # The checkpoint's weights replace any ImageNet start: do not read (or require) that file.
        model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    return AGCNN.from_config(model_cfg, num_classes=len(cfg.labels), image_size=cfg.data.image_size)


def start_as_global(model: nn.Module, plan: Stage, cfg: Config, seed_ckpt: dict[str, Any] | None) -> None:
    """A new stage whose seed checkpoint has not trained the branch it scores starts that branch
    as the global one, when its row's switch (``train.local_from_global``,
    ``train.fusion_from_global``) is on. A stage seeded from a later checkpoint (e.g. a finished
    fusion one, to fine-tune it: G L F*) keeps what that checkpoint learned."""
    if plan.from_global is None or not getattr(cfg.train, plan.from_global):
        return
    if seed_ckpt is not None and plan.scores in trained_branches(seed_ckpt):
        return
    # The local branch as a copy of the global branch; the fusion head as the global classifier.
    init = {"local": model.init_local_from_global, "fusion": model.init_fusion_from_global}
    init[plan.scores]()


def place_model(model: nn.Module, plan: Stage, cfg: Config, rt: Runtime) -> None:
    """Synchronised batch norm (``train.sync_batchnorm``), freezing, the device, the memory
    format and ``torch.compile`` of the backbones, as the config says."""
    if cfg.train.sync_batchnorm and rt.distributed:
        convert_sync_batchnorm(model, plan, rt)
    apply_freezing(model, plan)
    model.to(rt.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # Module.compile keeps parameter names, so checkpoints stay loadable without torch.compile.
        for m in plan.trains + plan.frozen:
            if m != "fusion":
                getattr(model, m).features.compile()


def restore(run: StageRun, ckpt: dict[str, Any]) -> None:
    """The state of a resumed stage from its last.pt: optimizer, schedule, progress, history and
    every process's random state."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    set_scheduled_lr(run.optimizer, run.scheduler)
    run.start_epoch, run.step = int(ckpt["epoch"]), int(ckpt["step"])
    run.best_metric, run.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
    run.history = list(ckpt.get("history", []))
    restore_rng(ckpt, run.rt, run.cfg.train.seed)
