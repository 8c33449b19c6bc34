"""Training: one loop driven by a stage table (paper Sec. 3.5 and 4.2).

AG-CNN is trained in three stages (Sec. 3.5):

I.   the global branch on the whole image;
II.  the local branch on the attended crops, the global branch fixed (it produces the heatmap);
III. the fusion head on the concatenated pool5 features, both branches fixed -- or, with
     ``train.finetune_all``, everything fine-tuned together (Table II, "G L F*").

Each stage is one row of :data:`agcnn.stages.STAGE_TABLE`: which modules train, which are
frozen, which logits are scored, and which earlier stage's ``best.pt`` seeds it. The loop
itself is the same for every row. Freezing is explicit -- ``requires_grad_(False)`` and ``.eval()`` so frozen
batch-norm statistics do not drift -- never a tiny learning rate. A stage whose seed
checkpoint is missing stops with an error that names the file and the stage to run first.

Run layout::

    RUN_DIR/config.yaml              the resolved configuration
    RUN_DIR/tb/                      TensorBoard
    RUN_DIR/<stage>/last.pt          end of the latest epoch (what --resume continues from)
    RUN_DIR/<stage>/best.pt          best validation mean AUC of the scored branch
    RUN_DIR/<stage>/log.csv          one row per epoch

Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on the CPU, nccl on
CUDA); ``batch_size`` is the total over all processes; only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from agcnn.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from agcnn.config import Config, ConfigError, StageConfig, describe_start
from agcnn.labels import check_labels
from agcnn.metrics import masked_bce_with_logits, mean_auc, per_class_auc, with_no_finding, youden_thresholds
from agcnn.precision import inference_precision
from agcnn.runtime import Runtime, all_gather, barrier, init_runtime, loader_workers, mean_over_ranks
from agcnn.stages import STAGES, Stage, apply_freezing, set_train_mode, stage_plan

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- device

def autocast(cfg: Config, device: torch.device):
    """bf16 autocast of training steps on CUDA when train.amp; full precision on the CPU.

    Validation does not use it: every score runs at train.inference_precision (agcnn.precision)."""
    return amp_context(cfg.train.amp, device)


def amp_context(amp: bool, device: torch.device):
    """bf16 autocast on CUDA when ``amp``; full precision otherwise (and always on the CPU)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _with_targets(pair: tuple[Tensor, Tensor], model: nn.Module) -> tuple[Tensor, Tensor]:
    """(logits, labels) of a source, with the "No Finding" target appended when the model has
    that 15th output (model.no_finding; agcnn.metrics.with_no_finding)."""
    logits, y = pair
    return logits, (with_no_finding(y) if getattr(model, "no_finding", False) else y)


def cosine_factor(epoch: int, epochs: int) -> float:
    """Share of the base learning rate in ``epoch`` (0-based) of a cosine schedule over ``epochs``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """After loading a cosine schedule's state: the learning rate its configured epochs give now
    (the optimiser's saved lr came from the schedule of the interrupted run)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)


def build_optimizer(params: list[nn.Parameter], sc: StageConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The stage's optimiser and its per-epoch learning-rate schedule."""
    if sc.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=sc.lr, betas=(sc.momentum, 0.999), weight_decay=sc.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=sc.lr, momentum=sc.momentum, weight_decay=sc.weight_decay)
    if sc.schedule == "cosine":
        # Closed form in the epoch (a function of the configured epochs, not of the last lr): a
        # stage resumed with more epochs continues on the longer schedule (see set_scheduled_lr).
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_factor, epochs=sc.epochs))
    # Paper Sec. 4.2: lr 0.01, divided by 10 every 20 epochs.
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=sc.lr_step, gamma=sc.lr_gamma)


def train_step(compute: Callable[[], tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer, *,
               device: torch.device, amp: bool) -> Tensor:
    """One optimizer step of any stage: ``compute()`` gives (logits, labels) -- under bf16
    autocast on CUDA when ``amp`` -- then the masked BCE (missing labels left out), backward and
    the step. Returns the loss, detached and on the device (reading it would synchronise a GPU).
    The benchmarks time this same function."""
    with amp_context(amp, device):
        logits, y = compute()
    loss = masked_bce_with_logits(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------- RNG state

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


# ---------------------------------------------------------------------- data

def make_loader(ds: Dataset, batch_size: int, *, train: bool, epoch: int, cfg: Config, rt: Runtime,
                num_workers: int | None = None, persistent: bool = False) -> DataLoader:
    """Training: shuffled per (seed, epoch), sharded across processes; evaluation: in order.

    ``persistent``: the workers stay alive for the next epoch (only for datasets whose workers
    draw nothing at random, i.e. transforms on the device); the sampler then has a generator of
    its own, which :func:`set_loader_epoch` reseeds, so epoch N draws the same order whether the
    loader is new or reused.
    """
    workers = loader_workers(cfg.data.num_workers if num_workers is None else num_workers)
    # Worker seeds (the augmentation in DataLoader workers) differ per rank; see rank_seed.
    g = epoch_generator(rank_seed(cfg.train.seed, rt.rank), epoch)
    sampler = None
    if train and rt.distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.train.seed)
        sampler.set_epoch(epoch)
        n_local = len(sampler)
    elif train:
        sampler = RandomSampler(ds, generator=epoch_generator(cfg.train.seed, epoch) if persistent else g)
        n_local = len(ds)
    else:
        n_local = len(ds)
    # Training drops a ragged last batch: a batch of one breaks batch norm in train mode.
    drop_last = train and n_local > batch_size
    from agcnn.data.datasets import collate

    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      collate_fn=collate, num_workers=workers, worker_init_fn=seed_worker if workers else None, generator=g,
                      pin_memory=rt.device.type == "cuda", persistent_workers=persistent and workers > 0)


def set_loader_epoch(loader: DataLoader, cfg: Config, epoch: int) -> None:
    """Reseed a reused (persistent) training loader's sampler for ``epoch``."""
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator.manual_seed(cfg.train.seed + epoch)


def batch_transform(ds: Dataset):
    """The dataset's transform for whole batches on the device (agcnn.data.device_transforms), if any."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return getattr(ds, "batch_transform", None)


def augment_on_device(cfg: Config, device: torch.device) -> bool:
    """data.augment_on: per batch on the training device, or per image in the loader workers."""
    return cfg.data.augment_on == "device" or (cfg.data.augment_on == "auto" and device.type == "cuda")


def model_input(x: Tensor, ds: Dataset, cfg: Config, rt: Runtime) -> Tensor:
    """A loader batch of ``ds`` as the model's input on the device: copied (from pinned memory,
    without waiting), then, for datasets that yield stored uint8 images, resized / cropped /
    flipped / normalised there by the dataset's batch transform."""
    fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    tf = batch_transform(ds)
    if tf is None:
        return x.to(rt.device, non_blocking=True, memory_format=fmt)
    return tf.to(rt.device)(x.to(rt.device, non_blocking=True)).contiguous(memory_format=fmt)


class Skips:
    """Images a ``data.skip_unreadable`` dataset could not decode: left out of their batches
    (see :func:`agcnn.data.datasets.collate`), each named in the log, counted for log.csv and
    the checkpoint."""

    def __init__(self) -> None:
        self.count = 0

    def batches(self, loader: Any):
        for batch in loader:
            if isinstance(batch, dict) and "unreadable" in batch:
                for message in batch.pop("unreadable"):
                    log.warning("skipped: %s", message)
                    self.count += 1
                if "image" not in batch:
                    continue
            yield batch


def _rows_of(batch: Any, fallback: np.ndarray) -> np.ndarray:
    return batch["index"].numpy() if isinstance(batch, dict) and "index" in batch else fallback


def _batch_xy(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["image"], batch["labels"]
    return batch[0], batch[1]


def _batch_len(batch: Any) -> int:
    """Images in a batch: a dict of images, or a tuple whose last item is the labels."""
    return len(batch["labels"] if isinstance(batch, dict) else batch[-1])


def _shard(ds: Dataset, rt: Runtime) -> tuple[Dataset, np.ndarray]:
    """This process's share of an evaluation set (every world-th item) and its indices."""
    idx = np.arange(rt.rank, len(ds), rt.world)
    return (Subset(ds, idx.tolist()) if rt.distributed else ds), idx


def _gather_rows(rt: Runtime, idx: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reassemble per-process rows (in dataset order) on every process; ``idx``: the dataset rows
    of this process's arrays (a row skipped as unreadable is in no process's).

    The shares travel as tensors (``all_gather``, padded to the longest), not as pickled objects.
    """
    if not rt.distributed:
        return arrays
    import torch.distributed as dist

    # nccl gathers CUDA tensors only; gloo gathers CPU tensors.
    dev = rt.device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([len(idx)], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(mine) for _ in range(rt.world)]
    dist.all_gather(counts, mine)
    counts = [int(c) for c in counts]
    longest = max(counts)

    def gather(a: np.ndarray) -> list[np.ndarray]:
        local = torch.zeros((max(longest, 1), *a.shape[1:]), dtype=torch.from_numpy(a[:0]).dtype, device=dev)
        local[: len(a)] = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        parts = [torch.empty_like(local) for _ in range(rt.world)]
        dist.all_gather(parts, local)
        return [part[:c].cpu().numpy() for part, c in zip(parts, counts)]

    idxs = gather(np.asarray(idx, dtype=np.int64))
    present = np.sort(np.concatenate(idxs))
    where = [np.searchsorted(present, i) for i in idxs]
    out = {}
    for key, a in arrays.items():
        full = np.empty((len(present), *a.shape[1:]), dtype=a.dtype)
        for w, part in zip(where, gather(a)):
            full[w] = part
        out[key] = full
    return out


# ---------------------------------------------------------------------- the per-stage "source"

class ImageSource:
    """Batches of images through the model (every stage; the default)."""

    def __init__(self, model: nn.Module, net: nn.Module, plan: Stage, cfg: Config, rt: Runtime,
                 train_ds: Dataset, val_ds: Dataset, batch_size: int):
        self.model, self.net, self.plan, self.cfg, self.rt = model, net, plan, cfg, rt
        self.train_ds, self.val_ds, self.batch_size = train_ds, val_ds, batch_size
        self.skips = Skips()
        # With the transforms on the device the workers draw nothing at random: keep them.
        self.persistent = batch_transform(train_ds) is not None
        self._loaders: dict[str, DataLoader] = {}
        # Stage III with both branches frozen (the paper's): the branches run without a graph and
        # only the fusion head is trained -- and, under torchrun, wrapped in DDP.
        self.head = _wrap_ddp(_FuseHead(model), rt) if _fusion_head_only(plan) else None

    def loader(self, epoch: int) -> DataLoader:
        tf = batch_transform(self.train_ds)
        if tf is None:
            return make_loader(self.train_ds, self.batch_size, train=True, epoch=epoch, cfg=self.cfg, rt=self.rt)
        # Crops and flips of epoch N depend on (seed, epoch, rank) only, as the order does.
        tf.reseed((self.cfg.train.seed * 100_003 + epoch) * 1_009 + self.rt.rank)
        if "train" not in self._loaders:
            self._loaders["train"] = make_loader(self.train_ds, self.batch_size, train=True, epoch=epoch, cfg=self.cfg,
                                                 rt=self.rt, persistent=True)
        set_loader_epoch(self._loaders["train"], self.cfg, epoch)
        return self._loaders["train"]

    def logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        x, y = _batch_xy(batch)
        y = y.to(self.rt.device, non_blocking=True)
        x = model_input(x, self.train_ds, self.cfg, self.rt)
        if self.head is not None:
            with torch.no_grad():
                out = self.model(x, stage="fusion")
            return self.head(out.global_pooled, out.local_pooled), y
        out = self.net(x, stage=self.plan.name)
        return out.logits(self.plan.scores, with_no_finding=True), y

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Probabilities of every reported branch on the validation set, in dataset order."""
        model = self.model
        was_training = model.training
        model.eval()
        shard, idx = _shard(self.val_ds, self.rt)
        if "val" in self._loaders:
            loader = self._loaders["val"]
        else:
            loader = make_loader(shard, self.batch_size, train=False, epoch=0, cfg=self.cfg, rt=self.rt,
                                 persistent=self.persistent)
            if self.persistent:
                self._loaders["val"] = loader
        probs: dict[str, list[np.ndarray]] = {b: [] for b in self.plan.reports}
        labels: list[np.ndarray] = []
        fwd = "global" if self.plan.reports == ("global",) else "fusion"
        rows: list[np.ndarray] = []
        for batch in self.skips.batches(loader):
            rows.append(_rows_of(batch, idx))
            x, y = _batch_xy(batch)
            with inference_precision(self.cfg.train.inference_precision, self.rt.device):
                out = model(model_input(x, self.val_ds, self.cfg, self.rt), stage=fwd)
            for b in self.plan.reports:
                probs[b].append(torch.sigmoid(out.logits(b).float()).cpu().numpy())
            labels.append(y.float().numpy())
        if was_training:
            set_train_mode(model, self.plan)
        k = len(self.cfg.labels)
        arrays = {b: np.concatenate(v) if v else np.zeros((0, k), np.float32) for b, v in probs.items()}
        arrays["labels"] = np.concatenate(labels) if labels else np.zeros((0, k), np.float32)
        full = _gather_rows(self.rt, np.concatenate(rows) if self.skips.count else idx, arrays)
        lab = full.pop("labels")
        return full, lab


def convert_sync_batchnorm(model: nn.Module, plan: Stage, rt: Runtime) -> None:
    """Batch norm of the modules the stage trains -> SyncBatchNorm (``train.sync_batchnorm``).

    The paper's batch of 64 over 8 GPUs leaves 8 images per batch-norm; synchronised, the
    statistics are those of the whole batch. Frozen modules stay in eval mode and need none.
    The parameter and buffer names do not change, so checkpoints load into plain batch norm.
    """
    if rt.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm does not run on the "
                          "CPU); set it to false for a CPU run")
    for name in plan.trains:
        if name != "fusion":
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))


def _wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun; itself in a single process."""
    if not rt.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def _fusion_head_only(plan: Stage) -> bool:
    """Stage III with both branches frozen: only the fusion head has trainable weights."""
    return plan.name == "fusion" and plan.trains == ("fusion",)


class _FuseHead(nn.Module):
    """The fusion head alone as a module, so DDP wraps (and broadcasts, and reduces) the fusion
    layer only, not the frozen branches around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Registered: the layers AGCNN.fuse uses. The model itself is kept out of the module tree.
        self.fusion, self.fusion_dropout = model.fusion, model.fusion_dropout
        object.__setattr__(self, "_model", model)

    def forward(self, g: Tensor, l: Tensor) -> Tensor:
        return self._model.fuse(g, l)


@torch.no_grad()
def _frozen_pass(model: nn.Module, plan: Stage, cfg: Config, rt: Runtime, skips: Skips, ds: Dataset, batch_size: int,
                 compute: Callable[[Tensor], dict[str, Tensor]], empty: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``compute`` of every image of ``ds`` through the model in eval mode, at the inference
    precision, with the labels: arrays in dataset order on every process. ``empty``: each
    array's shape when no image is left (every one unreadable)."""
    model.eval()
    shard, idx = _shard(ds, rt)
    loader = make_loader(shard, batch_size, train=False, epoch=0, cfg=cfg, rt=rt)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*empty, "labels")}
    rows: list[np.ndarray] = []
    before = skips.count
    for batch in skips.batches(loader):
        rows.append(_rows_of(batch, idx))
        x, lab = _batch_xy(batch)
        with inference_precision(cfg.train.inference_precision, rt.device):
            out = compute(model_input(x, ds, cfg, rt))
        for k, v in out.items():
            parts[k].append(v.cpu().numpy())
        parts["labels"].append(lab.float().numpy())
    set_train_mode(model, plan)
    shapes = {**empty, "labels": (0, len(cfg.labels))}
    arrays = {k: np.concatenate(v) if v else np.zeros(shapes[k], np.float32) for k, v in parts.items()}
    return _gather_rows(rt, np.concatenate(rows) if skips.count > before else idx, arrays)


class CachedFusionSource:
    """Stage III with both branches frozen: pool5 features computed once, reused every epoch.

    The frozen branches are deterministic functions of the input in eval mode, so with
    un-augmented (evaluation-transform) training images their pooled features never change;
    only the fusion head (one linear layer, Sec. 3.4) is trained on them.
    """

    def __init__(self, model: nn.Module, plan: Stage, cfg: Config, rt: Runtime, train_ds: Dataset, val_ds: Dataset,
                 batch_size: int, say: Callable[[str], None]):
        self.model, self.plan, self.cfg, self.rt, self.batch_size = model, plan, cfg, rt, batch_size
        self.skips = Skips()
        self.head = _wrap_ddp(_FuseHead(model), rt)
        t0 = time.perf_counter()
        self.train_feats = self._features(train_ds)
        self.val_feats = self._features(val_ds)
        say(f"fusion: cached pool5 features of {len(train_ds)} training and {len(val_ds)} validation images "
            f"in {time.perf_counter() - t0:.1f} s")
        g, l, y = (torch.from_numpy(self.train_feats[k]) for k in ("global", "local", "labels"))
        self.train_set = TensorDataset(g, l, y)
        # The frozen branches' own validation probabilities do not change either.
        with torch.no_grad(), inference_precision(cfg.train.inference_precision, rt.device):
            self.fixed_val = {
                b: torch.sigmoid(model.findings(branch.forward_head(torch.from_numpy(self.val_feats[b]).to(rt.device)))).cpu().numpy()
                for b, branch in (("global", model.global_branch), ("local", model.local_branch))
            }

    def _features(self, ds: Dataset) -> dict[str, np.ndarray]:
        model = self.model

        def pooled(x: Tensor) -> dict[str, Tensor]:
            out = model(x, stage="fusion")
            return {"global": out.global_pooled.float(), "local": out.local_pooled.float()}

        empty = {"global": (0, model.global_branch.num_features), "local": (0, model.local_branch.num_features)}
        return _frozen_pass(model, self.plan, self.cfg, self.rt, self.skips, ds, self.batch_size, pooled, empty)

    def loader(self, epoch: int) -> DataLoader:
        return make_loader(self.train_set, self.batch_size, train=True, epoch=epoch, cfg=self.cfg, rt=self.rt, num_workers=0)

    def logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        g, l, y = (t.to(self.rt.device, non_blocking=True) for t in batch)
        return self.head(g, l), y

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        g = torch.from_numpy(self.val_feats["global"]).to(self.rt.device)
        l = torch.from_numpy(self.val_feats["local"]).to(self.rt.device)
        was_training = self.model.training
        self.model.eval()
        with inference_precision(self.cfg.train.inference_precision, self.rt.device):
            fusion = torch.sigmoid(self.model.findings(self.model.fuse(g, l)).float()).cpu().numpy()
        if was_training:
            set_train_mode(self.model, self.plan)
        return {**self.fixed_val, "fusion": fusion}, self.val_feats["labels"]


class CachedCropSource:
    """Stage II with the global branch frozen: each image's attended crop computed once, the
    local branch trained on the crops every epoch (``train.cache_local_crops``).

    The frozen global branch is a deterministic function of its input in eval mode, so the
    heatmap, the box and the crop of an un-augmented (evaluation-transform) training image never
    change. Each epoch flips half of the crops at random: the crop of a mirrored image is the
    mirrored crop, up to the global branch's own asymmetry. The zoom augmentation of the
    images (``data.augment``) is not applied in this mode. Training crops are held as float16;
    validation crops as computed, so that the best epoch is chosen on the scores evaluate gives.
    """

    def __init__(self, model: nn.Module, plan: Stage, cfg: Config, rt: Runtime, train_ds: Dataset, val_ds: Dataset,
                 batch_size: int, say: Callable[[str], None]):
        self.model, self.plan, self.cfg, self.rt, self.batch_size = model, plan, cfg, rt, batch_size
        self.skips = Skips()
        self.branch = _wrap_ddp(model.local_branch, rt)
        size = check_crop_cache_fits(len(train_ds), len(val_ds), model.local_size, rt.world)
        t0 = time.perf_counter()
        self.train_crops = self._crops(train_ds, np.float16)
        self.val_crops = self._crops(val_ds, np.float32)
        say(f"local: cached the attended crops of {len(train_ds)} training and {len(val_ds)} validation images "
            f"({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
        self.train_set = TensorDataset(torch.from_numpy(self.train_crops["crops"]), torch.from_numpy(self.train_crops["labels"]))

    def _crops(self, ds: Dataset, dtype: type) -> dict[str, np.ndarray]:
        model = self.model
        store = torch.float16 if dtype == np.float16 else torch.float32

        def attended(x: Tensor) -> dict[str, Tensor]:
            out, crops = model.attend(x)
            # With the frozen global branch's probabilities: its validation scores every epoch.
            return {"crops": crops.to(store), "global": torch.sigmoid(model.findings(out.global_logits).float())}

        s = model.local_size
        crops = _frozen_pass(model, self.plan, self.cfg, self.rt, self.skips, ds, self.batch_size, attended,
                             {"crops": (0, 3, s, s), "global": (0, model.num_classes)})
        crops["crops"] = crops["crops"].astype(dtype, copy=False)
        return crops

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.rt.device, non_blocking=True).float()
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def loader(self, epoch: int) -> DataLoader:
        return make_loader(self.train_set, self.batch_size, train=True, epoch=epoch, cfg=self.cfg, rt=self.rt, num_workers=0)

    def logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        x, y = batch
        # Drawn on the CPU from the seeded generator: the same flips on any device.
        flip = (torch.rand(len(x)) < 0.5).to(self.rt.device)
        x = self._input(x)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.branch(x), y.to(self.rt.device, non_blocking=True)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        model, crops = self.model, torch.from_numpy(self.val_crops["crops"])
        was_training = model.training
        model.eval()
        probs = []
        with inference_precision(self.cfg.train.inference_precision, self.rt.device):
            for i in range(0, len(crops), self.batch_size):
                logits = model.findings(model.local_branch(self._input(crops[i : i + self.batch_size])))
                probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        if was_training:
            set_train_mode(model, self.plan)
        local = np.concatenate(probs) if probs else np.zeros((0, model.num_classes), np.float32)
        return {"global": self.val_crops["global"], "local": local}, self.val_crops["labels"]


def check_crop_cache_fits(n_train: int, n_val: int, local_size: int, processes: int = 1) -> int:
    """Bytes the cached crops take (3 channels; training float16, validation float32); an error if
    all processes together would need more than half of this machine's memory."""
    need = (n_train * 2 + n_val * 4) * 3 * local_size * local_size
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return need
    if need * processes > total / 2:
        raise ConfigError(
            f"train.cache_local_crops=true would hold {need * processes / 2**30:.1f} GiB of crops ({n_train} + {n_val} images "
            f"x 3 x {local_size} x {local_size}{f' in each of {processes} processes' if processes > 1 else ''}), more "
            f"than half of this machine's {total / 2**30:.1f} GiB; set train.cache_local_crops=false (crops computed "
            f"every epoch)"
        )
    return need


# ---------------------------------------------------------------------- checkpoints and logs

def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage


def _model_signature(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The config values a seed or resumed checkpoint must share: the model (but where its
    ImageNet start came from) and the input geometry the weights were trained at."""
    sig = {f"model.{k}": v for k, v in cfg_dict["model"].items() if k != "pretrained"}
    data = cfg_dict["data"]
    sig.update({f"data.{k}": data.get(k) for k in ("image_size", "resize", "highres_size")})
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
    mine, theirs = _model_signature(cfg.to_dict()), _model_signature(Config.from_dict(ckpt["config"]).to_dict())
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


def _plain_floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]


# ---------------------------------------------------------------------- the loop

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



def run_stage(
    cfg: Config,
    run_dir: Path,
    stage_name: str,
    datasets: dict[str, Dataset],
    rt: Runtime,
    *,
    resume: bool = False,
    seed_from: str | Path | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    writer: Any = None,
    left_out: list[dict[str, Any]] | None = None,
    split: dict[str, Any] | None = None,
) -> StageResult:
    """Train one stage of the table; returns where its checkpoints are and its best metric.

    The phases, each a function of its own: :func:`build_stage` (model, seed or resume,
    freezing, optimizer), then per epoch :func:`train_epoch` (the steps, :func:`train_step`
    each), :func:`validate_epoch` and :func:`save_epoch` (history, checkpoints, log).
    ``left_out``: the rows the pre-check left out (``data.skip_unreadable``), stored in the checkpoints;
    ``split``: the record of the training and validation split, stored in the checkpoints.
    """
    run = build_stage(cfg, run_dir, stage_name, datasets, rt, resume=resume, seed_from=seed_from, say=say,
                      left_out=left_out, split=split)
    if run.source is None:
        return run.result(skipped=True)
    for epoch in range(run.start_epoch, run.epochs):
        stats = train_epoch(run, epoch, progress=progress, writer=writer)
        scores = validate_epoch(run)
        save_epoch(run, epoch, stats, scores, writer=writer, say=say)
        barrier(rt)
    _check_replicas_agree(run.model, rt, stage_name)
    return run.result()


@dataclass
class StageRun:
    """One stage, built: its model and optimizer, where it writes, and how far it has got."""

    name: str
    plan: Stage
    cfg: Config
    rt: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    out: Path  # RUN_DIR/<stage>
    epochs: int
    source: Any = None  # ImageSource or CachedFusionSource; None when the stage has nothing left to train
    start_epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[dict[str, Any]] | None = None
    split: dict[str, Any] | None = None  # the training / validation split record (agcnn.data.provenance)
    skipped_so_far: int = 0  # images the loader could not decode, counted up to the last epoch

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


def build_stage(
    cfg: Config,
    run_dir: Path,
    stage_name: str,
    datasets: dict[str, Dataset],
    rt: Runtime,
    *,
    resume: bool = False,
    seed_from: str | Path | None = None,
    say: Callable[[str], None] = print,
    left_out: list[dict[str, Any]] | None = None,
    split: dict[str, Any] | None = None,
) -> StageRun:
    """The model of the stage -- resumed, seeded from the stage before, or new -- frozen as its
    row says, on the device, with its optimizer and the batches it trains on."""
    from agcnn.models import AGCNN

    plan = stage_plan(stage_name, cfg.train.finetune_all)
    sc = cfg.stage(stage_name)
    if sc.epochs < 1 or sc.batch_size < 1:
        raise ConfigError(f"train.{stage_name}.epochs ({sc.epochs}) and batch_size ({sc.batch_size}) must be at least 1")
    if sc.batch_size % rt.world:
        raise ConfigError(f"train.{stage_name}.batch_size={sc.batch_size} is the total over {rt.world} processes and must "
                          f"divide evenly; use a multiple of {rt.world}")
    batch_size = sc.batch_size // rt.world
    out = stage_dir(run_dir, stage_name)
    last_path = out / "last.pt"
    if len(datasets.get("val", [])) == 0:
        raise ConfigError("the validation split is empty; the best checkpoint is chosen on it. Set data.val_fraction > 0 "
                          "or data.val_list")

    seed_everything(cfg.train.seed)
    resuming = resume and last_path.is_file()
    seeded = resuming or seed_from is not None or plan.seed_from is not None
    model_cfg = cfg.model
    if seeded:
        # The checkpoint's weights replace any ImageNet start: do not read (or require) that file.
        model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    model = AGCNN.from_config(model_cfg, num_classes=len(cfg.labels), image_size=cfg.data.image_size)
    resume_ckpt = seed_ckpt = None
    if resuming:
        resume_ckpt = load_checkpoint(last_path)
        if resume_ckpt.get("stage") != stage_name:
            raise CheckpointError(f"{str(last_path)!r} belongs to stage {resume_ckpt.get('stage')!r}, not {stage_name!r}")
        check_same_model(resume_ckpt, cfg, f"{str(last_path)!r} (resumed)")
        model.load_state_dict(resume_ckpt["model"])
    elif last_path.exists() and not resume:
        raise ConfigError(f"{str(last_path)!r} already exists; pass --resume to continue that run, or choose a new --out")
    elif seed_from is not None:
        seed_ckpt = load_seed(model, Path(seed_from), cfg, plan, explicit=True)
    elif plan.seed_from is not None:
        seed_ckpt = load_seed(model, stage_dir(run_dir, plan.seed_from) / "best.pt", cfg, plan, explicit=False)

    # A fresh stage III starts its head as the global classifier; one seeded from a finished
    # fusion checkpoint (e.g. to fine-tune it, G L F*) keeps the head it learned.
    fresh_fusion = resume_ckpt is None and (seed_ckpt is None or seed_ckpt.get("stage") != "fusion")
    if stage_name == "fusion" and fresh_fusion and cfg.train.fusion_from_global:
        model.init_fusion_from_global()
    # A fresh stage II seeded by the global stage's checkpoint starts its local branch as the
    # global branch; one seeded from a later stage keeps the local branch it learned.
    fresh_local = resume_ckpt is None and seed_ckpt is not None and seed_ckpt.get("stage") == "global"
    if stage_name == "local" and fresh_local and cfg.train.local_from_global:
        model.init_local_from_global()
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
    net: nn.Module = model
    if plan.trains and not _fusion_head_only(plan) and not _use_crop_cache(cfg, plan):
        # In stage III with frozen branches the source wraps the fusion head alone, with
        # cached crops in stage II the local branch alone.
        net = _wrap_ddp(model, rt)
    if rt.rank:
        # Every process its own augmentation draws (rank 0 keeps train.seed); see rank_seed.
        seed_everything(rank_seed(cfg.train.seed, rt.rank))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, sc)

    run = StageRun(stage_name, plan, cfg, rt, model, optimizer, scheduler, out, sc.epochs, left_out=left_out,
                   split=split)
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        set_scheduled_lr(optimizer, scheduler)
        start_epoch, run.step = int(resume_ckpt["epoch"]), int(resume_ckpt["step"])
        run.start_epoch = start_epoch
        run.best_metric, run.best_epoch = float(resume_ckpt["best_metric"]), int(resume_ckpt["best_epoch"])
        run.history = list(resume_ckpt.get("history", []))
        rng = resume_ckpt["rng"]
        if rt.rank:
            others = resume_ckpt.get("rng_other_ranks") or []
            rng = others[rt.rank - 1] if len(others) >= rt.rank else None
        if rng is not None:
            set_rng_state(rng)
        else:  # resumed with more processes than wrote the checkpoint
            seed_everything(rank_seed(cfg.train.seed + start_epoch, rt.rank))
        if start_epoch >= sc.epochs:
            say(f"{stage_name}: already trained for {start_epoch} epoch(s) (train.{stage_name}.epochs={sc.epochs}); skipped")
            return run
        say(f"{stage_name}: resuming after epoch {start_epoch} from {last_path}")

    train_ds, val_ds = datasets["train"], datasets["val"]
    if _use_feature_cache(cfg, plan):
        run.source = CachedFusionSource(model, plan, cfg, rt, train_ds, val_ds, batch_size, say)
    elif _use_crop_cache(cfg, plan):
        run.source = CachedCropSource(model, plan, cfg, rt, train_ds, val_ds, batch_size, say)
    else:
        run.source = ImageSource(model, net, plan, cfg, rt, train_ds, val_ds, batch_size)
    return run


def train_epoch(run: StageRun, epoch: int, *, progress: bool = True, writer: Any = None) -> EpochStats:
    """One pass over the training batches, a :func:`train_step` each; then the learning-rate step."""
    cfg, rt, source, optimizer = run.cfg, run.rt, run.source, run.optimizer
    set_train_mode(run.model, run.plan)
    loader = source.loader(epoch)
    t0 = time.perf_counter()
    n_images, n_batches = 0, 0
    # Summed on the device: reading the loss every step would synchronise a GPU each step.
    loss_sum = torch.zeros((), device=rt.device)
    bar = _progress(len(loader), f"{run.name} {epoch + 1}/{run.epochs}", enabled=progress and rt.is_main)
    # With data.skip_unreadable a batch whose every image fails to decode is left out. (Under
    # DDP the other processes would then wait for this process's step; the pre-check has
    # already left out every file it can see is bad, so that takes a batch of damaged files.)
    for batch in source.skips.batches(loader):
        loss = train_step(lambda: _with_targets(source.logits(batch), run.model), optimizer, device=rt.device,
                          amp=cfg.train.amp)
        run.step += 1
        n_batches += 1
        n_images += _batch_len(batch)
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
    _sync_buffers(run.model, rt)
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


def save_epoch(run: StageRun, epoch: int, stats: EpochStats, scores: dict[str, Any], *, writer: Any = None,
               say: Callable[[str], None] = print) -> None:
    """The epoch's row in the history; best.pt when the scored branch improved, then last.pt, log.csv
    and TensorBoard (rank 0 only)."""
    cfg, rt, plan = run.cfg, run.rt, run.plan
    probs, val_labels, aucs, means = scores["probs"], scores["labels"], scores["aucs"], scores["means"]
    metric = means[plan.scores]
    improved = (not math.isnan(metric) and metric > run.best_metric) or run.best_epoch < 0
    if improved:
        run.best_metric, run.best_epoch = (metric if not math.isnan(metric) else -math.inf), epoch + 1
    row: dict[str, Any] = {
        "epoch": epoch + 1, "step": run.step, "lr": stats.lr, "train_loss": stats.train_loss,
        **{f"val_mean_auc_{b}": means[b] for b in plan.reports},
        "images_per_s": stats.images_per_s, "seconds": stats.seconds,
        "per_class": {plan.scores: _plain_floats(aucs[plan.scores])},
    }
    if cfg.data.skip_unreadable:
        # Images that failed to decode in this epoch's training and validation passes.
        row["skipped_images"] = sum(all_gather(rt, run.source.skips.count - run.skipped_so_far))
        run.skipped_so_far = run.source.skips.count
    run.history.append(row)
    # Every process's RNG state, so a resumed run continues each rank's own augmentation.
    rngs = all_gather(rt, rng_state())
    if not rt.is_main:
        return
    model = run.model
    # The split the weights were trained and validated on: evaluate refuses another one.
    extra = dict(stage=run.name, start=describe_start(cfg.model), plan=dataclasses.asdict(plan), epoch=epoch + 1, step=run.step,
                 best_metric=run.best_metric, best_epoch=run.best_epoch, history=run.history, split=run.split)
    if run.left_out:
        extra["left_out"] = run.left_out
    if improved:
        ops = {b: _plain_floats(youden_thresholds(probs[b], val_labels)) for b in plan.reports}
        save_checkpoint(run.best_path, model_state=model.state_dict(), config=cfg, metric=metric,
                        val_auc={b: _plain_floats(aucs[b]) for b in plan.reports}, operating_points=ops, **extra)
    # last.pt last: once it says "epoch N", best.pt already reflects epoch N.
    save_checkpoint(run.last_path, model_state=model.state_dict(), config=cfg, optimizer=run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(), rng=rngs[0], rng_other_ranks=rngs[1:], **extra)
    write_log(run.out / "log.csv", run.history, list(cfg.labels))
    if writer is not None:
        writer.add_scalar(f"{run.name}/train_loss", stats.train_loss, run.step)
        writer.add_scalar(f"{run.name}/lr", stats.lr, run.step)
        writer.add_scalar(f"{run.name}/images_per_s", row["images_per_s"], run.step)
        for b in plan.reports:
            writer.add_scalar(f"{run.name}/val_mean_auc_{b}", means[b], run.step)
        writer.flush()
    shown = ", ".join(f"{b} {means[b]:.4f}" for b in plan.reports)
    say(f"{run.name} epoch {epoch + 1}/{run.epochs}: train loss {stats.train_loss:.4f}, val mean AUC {shown}"
        f"{' (best)' if improved else ''}; {row['images_per_s']:.1f} img/s, {stats.seconds:.1f} s")


def _sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Batch-norm running statistics from rank 0 on every process.

    DDP broadcasts them at the start of each forward, so after the last step each process holds
    statistics updated with its own batch; validation and the checkpoint use rank 0's.
    """
    if not rt.distributed:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def _check_replicas_agree(model: nn.Module, rt: Runtime, stage_name: str) -> None:
    """Under DDP every process must end a stage with the weights rank 0 saved."""
    if not rt.distributed:
        return
    with torch.no_grad():
        digest = [float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()]
    parts = all_gather(rt, digest)
    if any(p != parts[0] for p in parts[1:]):
        raise RuntimeError(f"the {stage_name} stage ended with different weights on different processes; "
                           f"the saved checkpoint holds rank 0's. Check that every process sees the same data")


def _use_feature_cache(cfg: Config, plan: Stage) -> bool:
    return plan.name == "fusion" and cfg.train.cache_fusion_features and plan.frozen == ("global_branch", "local_branch")


def _use_crop_cache(cfg: Config, plan: Stage) -> bool:
    return plan.name == "local" and cfg.train.cache_local_crops and plan.trains == ("local_branch",)


def _trains_on_cache(cfg: Config, stage: str) -> bool:
    """The stage trains on what its frozen branches computed once from un-augmented images."""
    plan = stage_plan(stage, cfg.train.finetune_all)
    return _use_feature_cache(cfg, plan) or _use_crop_cache(cfg, plan)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


def _open_writer(run_dir: Path, rt: Runtime):
    if not rt.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a stripped install still trains
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def train(
    cfg: Config,
    run_dir: str | Path,
    stages: Sequence[str] = ("global", "local", "fusion"),
    *,
    resume: bool = False,
    seed_from: str | Path | None = None,
    datasets: dict[str, Dataset] | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, StageResult]:
    """Train ``stages`` in order into ``run_dir``; the library entry point of ``agcnn train``.

    ``datasets`` (``{"train": ..., "val": ...}``) replaces the ones built from ``cfg.data``.
    With ``resume``, a stage whose last.pt has all its epochs is skipped and a partly trained
    one continues from last.pt.
    """
    for s in stages:
        stage_plan(s)
    if seed_from is not None and len(stages) != 1:
        raise ConfigError("--seed-from initialises a single stage; combine it with --stage global|local|fusion, not 'all'")
    run_dir = Path(run_dir)
    rt = init_runtime(cfg.train.device)
    speak = say or print
    quiet: Callable[[str], None] = speak if rt.is_main else (lambda _m: None)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Fail before loading any data when a stage would overwrite a run or its seed is missing.
    if not resume:
        for s in stages:
            if (stage_dir(run_dir, s) / "last.pt").exists():
                raise ConfigError(f"{str(stage_dir(run_dir, s) / 'last.pt')!r} already exists; pass --resume to continue "
                                  f"that run, or choose a new --out")
    first = stage_plan(stages[0], cfg.train.finetune_all)
    if not (resume and (stage_dir(run_dir, first.name) / "last.pt").is_file()):
        if seed_from is not None:
            check_seed_exists(Path(seed_from), first, explicit=True)
        elif first.seed_from is not None:
            check_seed_exists(stage_dir(run_dir, first.seed_from) / "best.pt", first, explicit=False)
        else:
            # Only a stage that starts from scratch reads the ImageNet weights.
            from agcnn.models.backbones import check_start_weights

            check_start_weights(cfg.model)
    quiet(f"start: {describe_start(cfg.model)}")
    if datasets is None:
        from agcnn.data.datasets import build_datasets

        # Rank 0 first: it may generate the phantom set or write a cache the others then read.
        if not rt.is_main:
            barrier(rt)
        datasets = build_datasets(cfg, splits=("train", "val"), training=True, stored=augment_on_device(cfg, rt.device))
        if rt.is_main:
            barrier(rt)
    # Recorded before the pre-check: the split as its settings define it, which evaluate rebuilds.
    split = _split_record(cfg, datasets)
    # Every row's file exists and starts like an image, or the run stops here listing them all
    # (hours before the loader would reach one); with data.skip_unreadable they are left out.
    from agcnn.data.precheck import check_datasets

    t0 = time.perf_counter()
    datasets, problems, n_checked = check_datasets(datasets, skip_unreadable=cfg.data.skip_unreadable)
    if n_checked:
        quiet(f"data: {n_checked} image files checked in {time.perf_counter() - t0:.1f} s"
              + (f"; {len(problems)} left out (data.skip_unreadable)" if problems else ""))
    left_out = [{"split": p.split, "path": p.path, "reason": p.reason} for p in problems]
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: a kill mid-write must not leave a config that --resume then cannot read.
        atomic_write_bytes(run_dir / "config.yaml", lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))
    plain = _without_augmentation(cfg, datasets["train"]) if any(_trains_on_cache(cfg, s) for s in stages) else None
    writer = _open_writer(run_dir, rt)
    results: dict[str, StageResult] = {}
    try:
        for s in stages:
            ds = {**datasets, "train": plain} if _trains_on_cache(cfg, s) else datasets
            results[s] = run_stage(cfg, run_dir, s, ds, rt, resume=resume, seed_from=seed_from, progress=progress,
                                   say=quiet, writer=writer, left_out=left_out, split=split)
    finally:
        if writer is not None:
            writer.close()
    return results


def _split_record(cfg: Config, datasets: dict[str, Dataset]) -> dict[str, Any] | None:
    """What the checkpoints record of the training and validation split (agcnn.data.provenance);
    None when the datasets carry no table of paths and patients (e.g. tensors passed in)."""
    from agcnn.data.provenance import split_record

    tables = {s: getattr(datasets.get(s), "table", None) for s in ("train", "val")}
    if any(t is None or not {"path", "patient"} <= set(t.columns) for t in tables.values()):
        return None
    return split_record(cfg.data, tables)


def _without_augmentation(cfg: Config, ds: Dataset) -> Dataset:
    """The training set with evaluation transforms, for the stages that cache what frozen branches compute."""
    if batch_transform(ds) is not None:
        import copy

        from agcnn.data.device_transforms import DeviceTransform

        ds = copy.copy(ds)
        ds.batch_transform = DeviceTransform.from_config(cfg.data, train=False)
        return ds
    if hasattr(ds, "transform") and getattr(ds, "transform", None) is not None:
        import copy

        from agcnn.data.transforms import transforms_from_config

        ds = copy.copy(ds)
        ds.transform = transforms_from_config(cfg.data, train=False)
    return ds


# ---------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/); with --resume, defaults to RUN_DIR/config.yaml")
    parser.add_argument("--stage", default="all", choices=(*STAGES, "all"),
                        help="which stage to train; 'all' runs global, local, fusion in order (default)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: config.yaml, tb/, <stage>/best.pt ...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.global.epochs=5 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/<stage>/last.pt; completed stages are skipped")
    parser.add_argument("--seed-from", metavar="CKPT",
                        help="initialise the (single) stage from this checkpoint instead of RUN_DIR/<previous>/best.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (epoch summaries still print)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.out)
    config = args.config
    if config is None:
        if not args.resume:
            raise ConfigError("--config is required (e.g. --config configs/agcnn_r50.yaml); only --resume can take it "
                              "from RUN_DIR/config.yaml")
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"--resume without --config reads {str(config)!r}, which does not exist; pass --config")
    cfg = Config.load(config, args.overrides)
    stages = tuple(STAGES) if args.stage == "all" else (args.stage,)
    try:
        results = train(cfg, run_dir, stages, resume=args.resume, seed_from=args.seed_from, progress=not args.no_progress)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        for r in results.values():
            print(f"{r.stage}: best val mean AUC {r.best_metric:.4f} at epoch {r.best_epoch} -> {r.best_path}")
    return 0
