"""The loaders a stage draws its batches from, and a batch on its way to the model.

Training loaders are shuffled per (``train.seed``, epoch) and sharded across processes;
evaluation loaders run in order, each process over every world-th item (:func:`shard`).
Images that a ``data.skip_unreadable`` dataset could not decode are left out of their
batches and counted (:class:`Skips`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from agcnn.config import Config
from agcnn.runtime import Runtime, loader_workers
from agcnn.train.seeds import epoch_generator, rank_seed, seed_worker

log = logging.getLogger(__name__)


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


def without_augmentation(cfg: Config, ds: Dataset) -> Dataset:
    """The training set with evaluation transforms, for the stages that cache what frozen branches compute."""
    if batch_transform(ds) is not None:
        from agcnn.data.device_transforms import DeviceTransform

        ds = copy.copy(ds)
        ds.batch_transform = DeviceTransform.from_config(cfg.data, train=False)
        return ds
    if hasattr(ds, "transform") and getattr(ds, "transform", None) is not None:
        from agcnn.data.transforms import transforms_from_config

        ds = copy.copy(ds)
        ds.transform = transforms_from_config(cfg.data, train=False)
    return ds


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


def rows_of(batch: Any, fallback: np.ndarray) -> np.ndarray:
    """The dataset rows of a batch (its ``index``), or ``fallback`` for a batch without them."""
    return batch["index"].numpy() if isinstance(batch, dict) and "index" in batch else fallback


def batch_xy(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, labels) of a batch: a dict, or a tuple of the two."""
    if isinstance(batch, dict):
        return batch["image"], batch["labels"]
    return batch[0], batch[1]


def batch_len(batch: Any) -> int:
    """Images in a batch: a dict of images, or a tuple whose last item is the labels."""
    return len(batch["labels"] if isinstance(batch, dict) else batch[-1])


def shard(ds: Dataset, rt: Runtime) -> tuple[Dataset, np.ndarray]:
    """This process's share of an evaluation set (every world-th item) and its indices."""
    idx = np.arange(rt.rank, len(ds), rt.world)
    return (Subset(ds, idx.tolist()) if rt.distributed else ds), idx
