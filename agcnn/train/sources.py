"""Where a stage's batches come from: one :class:`BatchSource` protocol, three sources.

* :class:`ImageSource` -- images through the model, every stage (the default);
* :class:`CachedFusionSource` -- stage III with both branches frozen: their pool5 features
  computed once (``train.cache_fusion_features``);
* :class:`CachedCropSource` -- stage II with the global branch frozen: the attended crops
  computed once (``train.cache_local_crops``).

Which cache a stage may use is its row's ``cache`` in :data:`agcnn.stages.STAGE_TABLE`
(:func:`trains_on_cache`); :func:`make_source` picks the source from it. A frozen branch is a
deterministic function of its input in eval mode, so what it computes from an un-augmented
(evaluation-transform) training image never changes; the cached stages are given such a
training set.

Validation scores the way ``evaluate`` scores a checkpoint: images through
:func:`agcnn.inference.score` at ``train.inference_precision`` and the checkpoint's memory
format, so ``best.pt`` and its operating points are chosen on the scores evaluate and predict
give. The cached sources score their cached features and crops inside the same
:func:`~agcnn.precision.inference_precision`; the features come from :func:`~agcnn.inference.score`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from agcnn.config import Config
from agcnn.errors import ConfigError
from agcnn.inference import memory_format_of, score
from agcnn.precision import inference_precision
from agcnn.stages import Stage, set_train_mode
from agcnn.train.context import TrainContext
from agcnn.train.loaders import Skips, batch_transform, batch_xy, make_loader, model_input, rows_of, set_loader_epoch, shard
from agcnn.train.parallel import FuseHead, gather_rows, wrap_ddp


class BatchSource(Protocol):
    """What the loop needs of a stage's batches."""

    # Images left out as unreadable so far (training and validation passes).
    skips: Skips

    def loader(self, epoch: int) -> DataLoader:
        """The training batches of ``epoch``, drawn per (seed, epoch)."""
        ...

    def logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(logits of the scored branch, labels) of one training batch, on the device."""
        ...

    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Probabilities of every reported branch on the validation set, and its labels, in dataset order."""
        ...


def trains_on_cache(cfg: Config, plan: Stage) -> bool:
    """The stage trains on what its frozen branches computed once: its row names a cache and the
    config switches it on."""
    return plan.cache is not None and bool(getattr(cfg.train, plan.cache))


def make_source(model: nn.Module, plan: Stage, ctx: TrainContext, datasets: dict[str, Dataset],
                batch_size: int) -> BatchSource:
    """The stage's source: its row's cache when switched on, else the images."""
    kind = CACHED_SOURCES[plan.cache] if trains_on_cache(ctx.cfg, plan) else ImageSource
    return kind(model, plan, ctx, datasets, batch_size)


def forward_stage(plan: Stage) -> str:
    """The forward pass that computes every branch the stage reports: the global branch alone
    for a stage that reports only it, else the whole model."""
    return "global" if plan.reports == ("global",) else "fusion"


def scored(model: nn.Module, x: Tensor, cfg: Config, stage: str = "fusion"):
    """``x`` scored as evaluate scores a checkpoint of this config (:func:`agcnn.inference.score`)."""
    return score(model, x, precision=cfg.train.inference_precision, memory_format=memory_format_of(cfg), stage=stage)


def trains_head_only(plan: Stage) -> bool:
    """Stage III with both branches frozen: only the fusion head has trainable weights."""
    return plan.trains == ("fusion",)


@contextlib.contextmanager
def evaluating(model: nn.Module, plan: Stage) -> Iterator[None]:
    """``model`` in eval mode for the enclosed scores, then back in the stage's training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            set_train_mode(model, plan)


class ImageSource:
    """Batches of images through the model (every stage; the default)."""

    def __init__(self, model: nn.Module, plan: Stage, ctx: TrainContext, datasets: dict[str, Dataset], batch_size: int):
        self.model, self.plan, self.cfg, self.rt = model, plan, ctx.cfg, ctx.rt
        self.train_ds, self.val_ds, self.batch_size = datasets["train"], datasets["val"], batch_size
        self.skips = Skips()
        # With the transforms on the device the workers draw nothing at random: keep them.
        self.persistent = batch_transform(self.train_ds) is not None
        self._loaders: dict[str, DataLoader] = {}
        # Stage III with both branches frozen (the paper's): the branches run without a graph and
        # only the fusion head is trained -- and, under torchrun, wrapped in DDP.
        head_only = trains_head_only(plan)
        self.head = wrap_ddp(FuseHead(model), self.rt) if head_only else None
        self.net = wrap_ddp(model, self.rt) if plan.trains and not head_only else model

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
        x, y = batch_xy(batch)
        y = y.to(self.rt.device, non_blocking=True)
        x = model_input(x, self.train_ds, self.cfg, self.rt)
        if self.head is not None:
            with torch.no_grad():
                out = self.model(x, stage="fusion")
            return self.head(out.global_pooled, out.local_pooled), y
        out = self.net(x, stage=self.plan.name)
        return out.logits(self.plan.scores, with_no_finding=True), y

    def _val_loader(self, ds: Dataset) -> DataLoader:
        if "val" in self._loaders:
            return self._loaders["val"]
        loader = make_loader(ds, self.batch_size, train=False, epoch=0, cfg=self.cfg, rt=self.rt, persistent=self.persistent)
        if self.persistent:
            self._loaders["val"] = loader
        return loader

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Probabilities of every reported branch on the validation set, in dataset order."""
        part, idx = shard(self.val_ds, self.rt)
        probs: dict[str, list[np.ndarray]] = {b: [] for b in self.plan.reports}
        labels: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        with evaluating(self.model, self.plan):
            for batch in self.skips.batches(self._val_loader(part)):
                rows.append(rows_of(batch, idx))
                x, y = batch_xy(batch)
                out = scored(self.model, model_input(x, self.val_ds, self.cfg, self.rt), self.cfg, forward_stage(self.plan))
                for b in self.plan.reports:
                    probs[b].append(out.probabilities(b).cpu().numpy())
                labels.append(y.float().numpy())
        k = len(self.cfg.labels)
        arrays = {b: np.concatenate(v) if v else np.zeros((0, k), np.float32) for b, v in probs.items()}
        arrays["labels"] = np.concatenate(labels) if labels else np.zeros((0, k), np.float32)
        full = gather_rows(self.rt, np.concatenate(rows) if self.skips.count else idx, arrays)
        lab = full.pop("labels")
        return full, lab


@torch.no_grad()
def frozen_pass(model: nn.Module, plan: Stage, ctx: TrainContext, skips: Skips, ds: Dataset, batch_size: int,
                compute: Callable[[Tensor], dict[str, Tensor]], empty: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``compute`` of every image of ``ds`` through the model in eval mode (``compute`` runs it
    at the inference precision), with the labels: arrays in dataset order on every process.
    ``empty``: each array's shape when no image is left (every one unreadable)."""
    cfg, rt = ctx.cfg, ctx.rt
    model.eval()
    part, idx = shard(ds, rt)
    loader = make_loader(part, batch_size, train=False, epoch=0, cfg=cfg, rt=rt)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*empty, "labels")}
    rows: list[np.ndarray] = []
    before = skips.count
    for batch in skips.batches(loader):
        rows.append(rows_of(batch, idx))
        x, lab = batch_xy(batch)
        out = compute(model_input(x, ds, cfg, rt))
        for k, v in out.items():
            parts[k].append(v.cpu().numpy())
        parts["labels"].append(lab.float().numpy())
    set_train_mode(model, plan)
    shapes = {**empty, "labels": (0, len(cfg.labels))}
    arrays = {k: np.concatenate(v) if v else np.zeros(shapes[k], np.float32) for k, v in parts.items()}
    return gather_rows(rt, np.concatenate(rows) if skips.count > before else idx, arrays)


class CachedFusionSource:
    """Stage III with both branches frozen: pool5 features computed once, reused every epoch.

    The frozen branches are deterministic functions of the input in eval mode, so with
    un-augmented (evaluation-transform) training images their pooled features never change;
    only the fusion head (one linear layer, Sec. 3.4) is trained on them.
    """

    def __init__(self, model: nn.Module, plan: Stage, ctx: TrainContext, datasets: dict[str, Dataset], batch_size: int):
        self.model, self.plan, self.ctx, self.cfg, self.rt, self.batch_size = model, plan, ctx, ctx.cfg, ctx.rt, batch_size
        self.skips = Skips()
        self.head = wrap_ddp(FuseHead(model), self.rt)
        train_ds, val_ds = datasets["train"], datasets["val"]
        t0 = time.perf_counter()
        self.train_feats = self._features(train_ds)
        self.val_feats = self._features(val_ds)
        ctx.say(f"fusion: cached pool5 features of {len(train_ds)} training and {len(val_ds)} validation images "
                f"in {time.perf_counter() - t0:.1f} s")
        g, l, y = (torch.from_numpy(self.train_feats[k]) for k in ("global", "local", "labels"))
        self.train_set = TensorDataset(g, l, y)
        # The frozen branches' own validation probabilities do not change either.
        with torch.no_grad(), inference_precision(self.cfg.train.inference_precision, self.rt.device):
            self.fixed_val = {
                b: torch.sigmoid(model.findings(branch.forward_head(torch.from_numpy(self.val_feats[b]).to(self.rt.device)))).cpu().numpy()
                for b, branch in (("global", model.global_branch), ("local", model.local_branch))
            }

    def _features(self, ds: Dataset) -> dict[str, np.ndarray]:
        model = self.model

        def pooled(x: Tensor) -> dict[str, Tensor]:
            out = scored(model, x, self.cfg)
            return {"global": out.pooled["global"], "local": out.pooled["local"]}

        empty = {"global": (0, model.global_branch.num_features), "local": (0, model.local_branch.num_features)}
        return frozen_pass(model, self.plan, self.ctx, self.skips, ds, self.batch_size, pooled, empty)

    def loader(self, epoch: int) -> DataLoader:
        return make_loader(self.train_set, self.batch_size, train=True, epoch=epoch, cfg=self.cfg, rt=self.rt, num_workers=0)

    def logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        g, l, y = (t.to(self.rt.device, non_blocking=True) for t in batch)
        return self.head(g, l), y

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        g = torch.from_numpy(self.val_feats["global"]).to(self.rt.device)
        l = torch.from_numpy(self.val_feats["local"]).to(self.rt.device)
        with evaluating(self.model, self.plan), inference_precision(self.cfg.train.inference_precision, self.rt.device):
            fusion = torch.sigmoid(self.model.findings(self.model.fuse(g, l)).float()).cpu().numpy()
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

    def __init__(self, model: nn.Module, plan: Stage, ctx: TrainContext, datasets: dict[str, Dataset], batch_size: int):
        self.model, self.plan, self.ctx, self.cfg, self.rt, self.batch_size = model, plan, ctx, ctx.cfg, ctx.rt, batch_size
        self.skips = Skips()
        self.branch = wrap_ddp(model.local_branch, self.rt)
        train_ds, val_ds = datasets["train"], datasets["val"]
        size = check_crop_cache_fits(len(train_ds), len(val_ds), model.local_size, self.rt.world)
        t0 = time.perf_counter()
        self.train_crops = self._crops(train_ds, np.float16)
        self.val_crops = self._crops(val_ds, np.float32)
        ctx.say(f"local: cached the attended crops of {len(train_ds)} training and {len(val_ds)} validation images "
                f"({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
        self.train_set = TensorDataset(torch.from_numpy(self.train_crops["crops"]), torch.from_numpy(self.train_crops["labels"]))

    def _crops(self, ds: Dataset, dtype: type) -> dict[str, np.ndarray]:
        model = self.model
        store = torch.float16 if dtype == np.float16 else torch.float32

        def attended(x: Tensor) -> dict[str, Tensor]:
            with inference_precision(self.cfg.train.inference_precision, self.rt.device):
                out, crops = model.attend(x)
            # With the frozen global branch's probabilities: its validation scores every epoch.
            return {"crops": crops.to(store), "global": torch.sigmoid(model.findings(out.global_logits).float())}

        s = model.local_size
        crops = frozen_pass(model, self.plan, self.ctx, self.skips, ds, self.batch_size, attended,
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
        probs = []
        with evaluating(model, self.plan), inference_precision(self.cfg.train.inference_precision, self.rt.device):
            for i in range(0, len(crops), self.batch_size):
                logits = model.findings(model.local_branch(self._input(crops[i : i + self.batch_size])))
                probs.append(torch.sigmoid(logits.float()).cpu().numpy())
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


# A stage row's ``cache`` -> the source that trains on it.
CACHED_SOURCES: dict[str, type] = {"cache_fusion_features": CachedFusionSource, "cache_local_crops": CachedCropSource}
