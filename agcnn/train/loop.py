"""The training loop: :func:`train` runs the stages in order, :func:`run_stage` one stage, epoch
by epoch -- :func:`train_epoch` (a :func:`~agcnn.train.step.train_step` per batch),
:func:`validate_epoch`, then :func:`~agcnn.train.outputs.save_epoch`. The loop is the same
for every row of the stage table; what differs (what trains, what is frozen, what is scored,
which cache it may use) is read from the row.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from agcnn.config import Config, describe_start
from agcnn.errors import ConfigError
from agcnn.metrics import mean_auc, per_class_auc
from agcnn.runtime import barrier, init_runtime, mean_over_ranks
from agcnn.stages import STAGES, set_train_mode, stage_plan
from agcnn.train.context import TrainContext
from agcnn.train.loaders import augment_on_device, batch_len, without_augmentation
from agcnn.train.outputs import open_writer, save_epoch, write_config
from agcnn.train.parallel import check_replicas_agree, sync_buffers
from agcnn.train.seeds import check_start_points, stage_dir
from agcnn.train.sources import trains_on_cache
from agcnn.train.stage import EpochStats, StageResult, StageRun, build_stage
from agcnn.train.step import train_step, with_targets


def train(
    cfg: Config,
    run_dir: str | Path,
    stages: Sequence[str] = tuple(STAGES),
    *,
    resume: bool = False,
    seed_from: str | Path | None = None,
    datasets: dict[str, Dataset] | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    allow_seed_overlap: bool = False,
) -> dict[str, StageResult]:
    """Train ``stages`` in order into ``run_dir``; the library entry point of ``agcnn train``.

    ``datasets`` (``{"train": ..., "val": ...}``) replaces the ones built from ``cfg.data``.
    With ``resume``, a stage whose last.pt has all its epochs is skipped and a partly trained
    one continues from last.pt. ``allow_seed_overlap``: start from a checkpoint trained on this
    run's held-out patients anyway (refused otherwise; see :func:`agcnn.data.provenance.check_seed`).
    """
    for s in stages:
        stage_plan(s)
    if seed_from is not None and len(stages) != 1:
        raise ConfigError("--seed-from initialises a single stage; combine it with --stage global|local|fusion, not 'all'")
    rt = init_runtime(cfg.train.device)
    speak = say or print
    ctx = TrainContext(cfg, rt, Path(run_dir), resume=resume, seed_from=seed_from, progress=progress,
                       say=speak if rt.is_main else (lambda _m: None), allow_seed_overlap=allow_seed_overlap)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Fail before loading any data when a stage would overwrite a run or its seed is missing.
    check_start_points(ctx, stages)
    ctx.say(f"start: {describe_start(cfg.model)}")
    datasets, ctx.split, ctx.left_out = load_datasets(ctx, datasets, stages)
    if rt.is_main:
        write_config(ctx.run_dir, cfg)
    on_cache = {s: trains_on_cache(cfg, stage_plan(s, cfg.train.finetune_all)) for s in stages}
    plain = without_augmentation(cfg, datasets["train"]) if any(on_cache.values()) else None
    ctx.writer = open_writer(ctx.run_dir, rt)
    results: dict[str, StageResult] = {}
    try:
        for s in stages:
            results[s] = run_stage(ctx, s, {**datasets, "train": plain} if on_cache[s] else datasets)
    finally:
        if ctx.writer is not None:
            ctx.writer.close()
    return results


def load_datasets(ctx: TrainContext, datasets: dict[str, Dataset] | None, stages: Sequence[str] = ()
                  ) -> tuple[dict[str, Dataset], dict[str, Any] | None, list[dict[str, Any]]]:
    """The training and validation sets (built from the config unless given), the record of
    their split, and the rows the pre-check left out. The checkpoints ``stages`` start from must
    not have trained on this run's validation or test patients (:func:`check_start_patients`)."""
    cfg, rt = ctx.cfg, ctx.rt
    whole = None
    if datasets is None:
        from agcnn.data.datasets import build_datasets, load_dataframe

        # Rank 0 first: it may generate the phantom set or write a cache the others then read.
        if not rt.is_main:
            barrier(rt)
        whole = load_dataframe(cfg)  # every split: a seed's training patients must not be in val or test
        datasets = build_datasets(cfg, splits=("train", "val"), training=True, stored=augment_on_device(cfg, rt.device),
                                  table=whole)
        if rt.is_main:
            barrier(rt)
    # Recorded before the pre-check: the split as its settings define it, which evaluate rebuilds.
    split = split_record(cfg, datasets)
    check_start_patients(ctx, stages, split, whole, datasets)
    # Every row's file exists and starts like an image, or the run stops here listing them all
    # (hours before the loader would reach one); with data.skip_unreadable they are left out.
    from agcnn.data.precheck import check_datasets

    t0 = time.perf_counter()
    datasets, problems, n_checked = check_datasets(datasets, skip_unreadable=cfg.data.skip_unreadable)
    if n_checked:
        ctx.say(f"data: {n_checked} image files checked in {time.perf_counter() - t0:.1f} s"
                + (f"; {len(problems)} left out (data.skip_unreadable)" if problems else ""))
    from agcnn.data.provenance import left_out_summary

    left_out = left_out_summary(problems)  # counts only: paths may hold patients' names
    return datasets, split, left_out


def split_record(cfg: Config, datasets: dict[str, Dataset]) -> dict[str, Any] | None:
    """What the checkpoints record of the training and validation split (agcnn.data.provenance);
    None when the datasets carry no table of paths and patients (e.g. tensors passed in)."""
    from agcnn.data.provenance import site_key
    from agcnn.data.provenance import split_record as record

    tables = {s: getattr(datasets.get(s), "table", None) for s in ("train", "val")}
    if any(t is None or not {"path", "patient"} <= set(t.columns) for t in tables.values()):
        return None
    return record(cfg.data, tables, key=site_key())


def check_start_patients(ctx: TrainContext, stages: Sequence[str], split: dict[str, Any] | None, whole,
                         datasets: dict[str, Dataset]) -> None:
    """Every checkpoint a stage will start from (resumed, --seed-from, or the stage before's best.pt
    already on disk) must not have trained on this run's validation or test patients
    (agcnn.data.provenance.check_seed); what --allow-seed-overlap lets through is recorded in ``split``."""
    if split is None:
        return
    import pandas as pd

    from agcnn.checkpoint import load_checkpoint
    from agcnn.data.provenance import allow_start, check_seed, site_key

    table = whole if whole is not None else pd.concat([datasets[s].table for s in ("train", "val")], ignore_index=True)
    for i, s in enumerate(stages):
        plan = stage_plan(s, ctx.cfg.train.finetune_all)
        last = stage_dir(ctx.run_dir, s) / "last.pt"
        if ctx.resume and last.is_file():
            start, how = last, "resume"
        elif i == 0 and ctx.seed_from is not None:
            start, how = Path(ctx.seed_from), "seed"
        elif plan.seed_from is not None and (stage_dir(ctx.run_dir, plan.seed_from) / "best.pt").is_file():
            start, how = stage_dir(ctx.run_dir, plan.seed_from) / "best.pt", "seed"
        else:
            continue
        allow_start(split, check_seed(load_checkpoint(start), split, table, ctx.cfg.data, stage=s,
                                      allow=ctx.allow_seed_overlap, key=site_key(), how=how))


def run_stage(ctx: TrainContext, stage_name: str, datasets: dict[str, Dataset]) -> StageResult:
    """Train one stage of the table; returns where its checkpoints are and its best metric.

    The phases, each a function of its own: :func:`~agcnn.train.stage.build_stage` (model, seed
    or resume, freezing, optimizer, source), then per epoch :func:`train_epoch`,
    :func:`validate_epoch` and :func:`~agcnn.train.outputs.save_epoch` (history, checkpoints, log).
    """
    run = build_stage(ctx, stage_name, datasets)
    if run.source is None:
        return run.result(skipped=True)
    for epoch in range(run.start_epoch, run.epochs):
        stats = train_epoch(run, epoch)
        scores = validate_epoch(run)
        save_epoch(run, epoch, stats, scores)
        barrier(ctx.rt)
    check_replicas_agree(run.model, ctx.rt, stage_name)
    return run.result()


def train_epoch(run: StageRun, epoch: int) -> EpochStats:
    """One pass over the training batches, a :func:`train_step` each; then the learning-rate step."""
    cfg, rt, source, optimizer, writer = run.cfg, run.rt, run.source, run.optimizer, run.ctx.writer
    set_train_mode(run.model, run.plan)
    loader = source.loader(epoch)
    t0 = time.perf_counter()
    n_images, n_batches = 0, 0
    # Summed on the device: reading the loss every step would synchronise a GPU each step.
    loss_sum = torch.zeros((), device=rt.device)
    bar = progress_bar(len(loader), f"{run.name} {epoch + 1}/{run.epochs}", enabled=run.ctx.progress and rt.is_main)
    # With data.skip_unreadable a batch whose every image fails to decode is left out. (Under
    # DDP the other processes would then wait for this process's step; the pre-check has
    # already left out every file it can see is bad, so that takes a batch of damaged files.)
    for batch in source.skips.batches(loader):
        loss = train_step(lambda: with_targets(source.logits(batch), run.model), optimizer, device=rt.device,
                          amp=cfg.train.amp)
        run.step += 1
        n_batches += 1
        n_images += batch_len(batch)
        loss_sum += loss
        if run.step % max(cfg.train.log_every, 1) == 0:
            if bar is not None:
                rate = n_images * rt.world / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(loss_sum) / n_batches:.4f}", img_s=f"{rate:.1f}", refresh=False)
            if writer is not None:
                writer.add_scalar(f"{run.name}/train_loss_step", float(loss), run.step)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    sync_buffers(run.model, rt)
    lr = optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    return EpochStats(train_loss=mean_over_ranks(rt, float(loss_sum), n_batches), lr=lr, seconds=seconds,
                      images=n_images * rt.world)


def validate_epoch(run: StageRun) -> dict[str, Any]:
    """Validation probabilities of every reported branch, their per-class and mean AUCs."""
    plan = run.plan
    probs, val_labels = run.source.validate()
    aucs = {b: per_class_auc(probs[b], val_labels) for b in plan.reports}
    return {"probs": probs, "labels": val_labels, "aucs": aucs, "means": {b: float(mean_auc(aucs[b])) for b in plan.reports}}


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
