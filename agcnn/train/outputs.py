"""What a run writes: ``config.yaml``, and after each epoch its history row, ``best.pt`` when
the scored branch improved, ``last.pt``, ``log.csv`` and TensorBoard (rank 0 only).

Run layout::

    RUN_DIR/config.yaml              the resolved configuration
    RUN_DIR/tb/                      TensorBoard
    RUN_DIR/<stage>/last.pt          end of the latest epoch (what --resume continues from)
    RUN_DIR/<stage>/best.pt          best validation mean AUC of the scored branch
    RUN_DIR/<stage>/log.csv          one row per epoch
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agcnn.checkpoint import save_checkpoint
from agcnn.config import Config, describe_start
from agcnn.fileio import atomic_write_bytes
from agcnn.metrics import youden_thresholds
from agcnn.runtime import Runtime, all_gather
from agcnn.train.seeds import rng_state
from agcnn.train.stage import EpochStats, StageRun


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.yaml, the resolved configuration (what ``--resume`` reads back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: a kill mid-write must not leave a config that --resume then cannot read.
    atomic_write_bytes(run_dir / "config.yaml", lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))


def open_writer(run_dir: Path, rt: Runtime):
    """TensorBoard's writer for RUN_DIR/tb on rank 0; None elsewhere or without tensorboard."""
    if not rt.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a stripped install still trains
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def save_epoch(run: StageRun, epoch: int, stats: EpochStats, scores: dict[str, Any]) -> None:
    """The epoch's row in the history; best.pt when the scored branch improved, then last.pt, log.csv
    and TensorBoard (rank 0 only)."""
    cfg, rt, plan = run.cfg, run.rt, run.plan
    metric = scores["means"][plan.scores]
    improved = (not math.isnan(metric) and metric > run.best_metric) or run.best_epoch < 0
    if improved:
        run.best_metric, run.best_epoch = (metric if not math.isnan(metric) else -math.inf), epoch + 1
    row = epoch_row(run, epoch, stats, scores)
    run.history.append(row)
    # Every process's RNG state, so a resumed run continues each rank's own augmentation.
    rngs = all_gather(rt, rng_state())
    if not rt.is_main:
        return
    save_checkpoints(run, epoch, scores, rngs, best=improved)
    write_log(run.out / "log.csv", run.history, list(cfg.labels))
    log_to_tensorboard(run, stats, scores["means"], row)
    means = scores["means"]
    shown = ", ".join(f"{b} {means[b]:.4f}" for b in plan.reports)
    run.ctx.say(f"{run.name} epoch {epoch + 1}/{run.epochs}: train loss {stats.train_loss:.4f}, val mean AUC {shown}"
                f"{' (best)' if improved else ''}; {row['images_per_s']:.1f} img/s, {stats.seconds:.1f} s")


def epoch_row(run: StageRun, epoch: int, stats: EpochStats, scores: dict[str, Any]) -> dict[str, Any]:
    """The epoch's row of the history (log.csv and the checkpoints carry it)."""
    plan, means = run.plan, scores["means"]
    row: dict[str, Any] = {
        "epoch": epoch + 1, "step": run.step, "lr": stats.lr, "train_loss": stats.train_loss,
        **{f"val_mean_auc_{b}": means[b] for b in plan.reports},
        "images_per_s": stats.images_per_s, "seconds": stats.seconds,
        "per_class": {plan.scores: plain_floats(scores["aucs"][plan.scores])},
    }
    if run.cfg.data.skip_unreadable:
        # Images that failed to decode in this epoch's training and validation passes.
        row["skipped_images"] = sum(all_gather(run.rt, run.source.skips.count - run.skipped_so_far))
        run.skipped_so_far = run.source.skips.count
    return row


def save_checkpoints(run: StageRun, epoch: int, scores: dict[str, Any], rngs: list[Any], *, best: bool) -> None:
    """best.pt (when ``best``) with its validation AUCs and operating points, then last.pt with
    what a resumed run needs: optimizer, schedule and every process's random state."""
    cfg, plan, model = run.cfg, run.plan, run.model
    # The split the weights were trained and validated on: evaluate refuses another one.
    extra = dict(stage=run.name, start=describe_start(cfg.model), plan=dataclasses.asdict(plan), epoch=epoch + 1, step=run.step,
                 best_metric=run.best_metric, best_epoch=run.best_epoch, history=run.history, split=run.split)
    if run.ctx.left_out:
        extra["left_out"] = run.ctx.left_out
    if best:
        probs, labels, aucs = scores["probs"], scores["labels"], scores["aucs"]
        ops = {b: plain_floats(youden_thresholds(probs[b], labels)) for b in plan.reports}
        save_checkpoint(run.best_path, model_state=model.state_dict(), config=cfg, metric=scores["means"][plan.scores],
                        val_auc={b: plain_floats(aucs[b]) for b in plan.reports}, operating_points=ops, **extra)
    # last.pt last: once it says "epoch N", best.pt already reflects epoch N.
    save_checkpoint(run.last_path, model_state=model.state_dict(), config=cfg, optimizer=run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(), rng=rngs[0], rng_other_ranks=rngs[1:], **extra)


def log_to_tensorboard(run: StageRun, stats: EpochStats, means: dict[str, float], row: dict[str, Any]) -> None:
    writer = run.ctx.writer
    if writer is None:
        return
    writer.add_scalar(f"{run.name}/train_loss", stats.train_loss, run.step)
    writer.add_scalar(f"{run.name}/lr", stats.lr, run.step)
    writer.add_scalar(f"{run.name}/images_per_s", row["images_per_s"], run.step)
    for b in run.plan.reports:
        writer.add_scalar(f"{run.name}/val_mean_auc_{b}", means[b], run.step)
    writer.flush()


def write_log(path: Path, history: list[dict[str, Any]], labels: Sequence[str]) -> None:
    """log.csv from the history carried in last.pt, so a resumed run's log has each epoch once."""
    if not history:
        return
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys and k != "per_class":
                keys.append(k)
    per_class_cols = [f"val_auc_{b}_{lab}" for b in history[-1].get("per_class", {}) for lab in labels]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys + per_class_cols)
    for row in history:
        vals = [row.get(k, "") for k in keys]
        pc = row.get("per_class", {})
        vals += [v for b in pc for v in pc[b]]
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in vals])
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))


def plain_floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]
