"""The training dataset and the factory that builds train / val / test from the configuration.

Every source (generated phantoms, ChestX-ray14, your own CSV export) is first brought into one
table: ``path`` (absolute or relative to ``data.root``), ``patient``, ``split`` and one float
column per label, NaN where the label is missing. :class:`XrayDataset` reads that table.

An item is a dict::

    {"image": FloatTensor[3, S, S],   # ImageNet-normalised, S = data.highres_size
     "labels": FloatTensor[K],        # 0 / 1, NaN = missing (masked out of loss and metrics)
     "index": int}                    # row in the dataset's table (dataset.table)

or, with ``stored_size=C`` (transforms on the device, :mod:`agcnn.data.device_transforms`), the
image as the cache stores it: ``[1, C, C]`` uint8 (uint16 from a 16-bit cache), read from the
cache or decoded and resized the way ``agcnn prepare`` does; the loader then only decodes.


A file that cannot be decoded raises :class:`ImageLoadError` naming it and its row: training data
is curated, and a silently skipped image would change the data without anyone noticing. With
``skip_unreadable`` (``data.skip_unreadable``) the item is ``{"unreadable": message, "index": i}``
instead, and :func:`collate` leaves it out of the batch and lists it under ``"unreadable"`` for
the loop to count. :mod:`agcnn.data.precheck` finds most such files before the first step;
``agcnn prepare`` lists every undecodable file in one pass.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from agcnn.config import DATASETS
from agcnn.data.cache import ImageCache, UnusableCachedImage, resolve
from agcnn.data.scope import OVERRIDES, ScopePolicy
from agcnn.data.tables import SPLITS
from agcnn.errors import AgcnnError, ConfigError, DataError
from agcnn.labels import LABELS

log = logging.getLogger(__name__)


class ImageLoadError(AgcnnError, RuntimeError):
    """An image in the data table cannot be read; the message names the file, its row and the reason."""

    def __init__(self, message: str):
        # A DataLoader worker's exception comes back as this class built from "Caught
        # ImageLoadError in DataLoader worker process N. Original Traceback ... ImageLoadError:
        # MESSAGE": keep MESSAGE, the line that names the file and the row.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class XrayDataset(Dataset):
    """Images and multi-label targets from a table with ``path`` and one column per label."""

    def __init__(
        self,
        table: pd.DataFrame,
        labels: Sequence[str],
        *,
        root: str | Path = ".",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: ImageCache | None = None,
        cache_rows: Sequence[int] | None = None,
        name: str = "dataset",
        skip_unreadable: bool = False,
        scope: ScopePolicy | None = None,
        stored_size: int | None = None,
    ):
        missing = [c for c in ("path", *labels) if c not in table.columns]
        if missing:
            raise DataError(f"the {name} table lacks columns {missing}; it needs 'path' and one column per label")
        if cache is not None and (cache_rows is None or len(cache_rows) != len(table)):
            raise ValueError("cache_rows must give the cache row of every table row (see ImageCache.verify)")
        self.table = table.reset_index(drop=True)
        self.labels = list(labels)
        self.root = Path(root)
        self.transform = transform
        self.cache = cache
        self.cache_rows = None if cache_rows is None else np.asarray(cache_rows, dtype=np.int64)
        self.name = name
        self.skip_unreadable = skip_unreadable
        self.scope = scope
        self.stored_size = stored_size
        if stored_size is not None and transform is not None:
            raise ValueError("a dataset with stored_size yields integer images for the device transforms; give it no transform")
        # One contiguous array: indexing a DataFrame per item is slow in DataLoader workers.
        self.targets = self.table[self.labels].to_numpy(dtype=np.float32)
        self.paths = self.table["path"].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self) -> dict[str, Any]:
        """Which pixels the model is given: the originals decoded (``original``), or the squares of
        the ``agcnn prepare`` cache (``prepare_cache``), which are resized and rounded to integers
        before the transform, so a model's scores differ slightly between the two. Recorded beside
        every score and every operating point (``auc.json``, the predict manifest)."""
        if self.cache is not None:
            return {"source": "prepare_cache", "cache": str(self.cache.folder), "size": self.cache.size,
                    "dtype": str(self.cache.meta.get("dtype"))}
        if self.stored_size is not None:
            return {"source": "original_resized", "size": int(self.stored_size)}
        return {"source": "original"}

    def __getstate__(self) -> dict:
        # Workers never apply the batch transform (the training loop does, on the device).
        state = self.__dict__.copy()
        state.pop("batch_transform", None)
        return state

    def load(self, i: int, stored: bool = False) -> np.ndarray:
        """The decoded image ``i`` as float32 ``[H, W]`` in [0, 1], bright = dense; ``stored``:
        as the cache holds it, integer ``[C, C]`` with ``C = stored_size``."""
        from agcnn.data.cache import decode_resized
        from agcnn.data.readers import UnusableImageError, read_image

        path = self.paths[i]
        try:
            if stored:
                if self.cache is not None and self.cache.size == self.stored_size:
                    return self.cache.read_stored(int(self.cache_rows[i]))
                return decode_resized(resolve(path, self.root), self.stored_size, scope=self.scope)
            if self.cache is not None:
                return self.cache.read(int(self.cache_rows[i]))
            return read_image(resolve(path, self.root), scope=self.scope)
        except UnusableImageError as e:
            reason = f"{e.reason}: {e}"
            if e.reason in OVERRIDES:
                reason += f" (data.{OVERRIDES[e.reason]}: true trains on it anyway)"
        except UnusableCachedImage as e:
            reason = f"{e.reason} (recorded by agcnn prepare)"
        except (OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
        raise ImageLoadError(
            f"cannot read image {path!r} (row {i} of the {self.name} set, data.root={str(self.root)!r}): {reason.rstrip('.')}. "
            f"Fix the file or remove it from the table, or set data.skip_unreadable=true to leave such files out"
        )

    def without_rows(self, rows: set[int] | Sequence[int]) -> "XrayDataset":
        """The same dataset less ``rows`` (positions in this dataset); row numbers shift."""
        keep = np.setdiff1d(np.arange(len(self)), np.fromiter(rows, dtype=np.int64))
        out = XrayDataset(
            self.table.iloc[keep], self.labels, root=self.root, transform=self.transform, cache=self.cache,
            cache_rows=None if self.cache_rows is None else self.cache_rows[keep], name=self.name,
            skip_unreadable=self.skip_unreadable, scope=self.scope, stored_size=self.stored_size,
        )
        if hasattr(self, "batch_transform"):
            out.batch_transform = self.batch_transform
        return out

    def __getitem__(self, i: int) -> dict:
        try:
            pixels = self.load(i, stored=self.stored_size is not None)
        except ImageLoadError as e:
            if not self.skip_unreadable:
                raise
            return {"unreadable": str(e), "index": int(i)}
        image = torch.from_numpy(np.ascontiguousarray(pixels))[None]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "labels": torch.from_numpy(self.targets[i].copy()), "index": int(i)}


def scope_policy(data_cfg) -> ScopePolicy:
    """The scope checks of ``cfg.data`` (``any_body_part``, ``any_view``)."""
    return ScopePolicy(any_body_part=data_cfg.any_body_part, any_view=data_cfg.any_view)


def collate(batch: list) -> Any:
    """``default_collate``, less the items a ``skip_unreadable`` dataset could not read: their
    messages go under ``"unreadable"`` (a batch of nothing else has no ``"image"``)."""
    from torch.utils.data import default_collate

    if not batch or not isinstance(batch[0], dict) or not any("unreadable" in b for b in batch):
        return default_collate(batch)
    kept = [b for b in batch if "unreadable" not in b]
    out = default_collate(kept) if kept else {}
    out["unreadable"] = [b["unreadable"] for b in batch if "unreadable" in b]
    return out


# ---------------------------------------------------------------------- configuration -> tables

def check_label_names(labels: Sequence[str], *, known: Sequence[str] = LABELS, source: str = "ChestX-ray14") -> None:
    """The configured labels must be unique and, for NIH-style sources, NIH finding names."""
    labels = list(labels)
    if not labels:
        raise ConfigError(f"the label list is empty; use e.g. labels: {list(known)}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"labels {dup} appear more than once in the label list")
    for name in labels:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"label {name!r} is not a {source} label{hint} Valid: {list(known)}")


def load_dataframe(cfg) -> pd.DataFrame:
    """The whole table (every split) for ``cfg.data``: ``path, patient, split`` + the label columns."""
    from agcnn.data.chestxray14 import load_chestxray14
    from agcnn.data.tables import load_table

    d = cfg.data
    labels = list(cfg.labels)
    if d.dataset not in DATASETS:
        close = difflib.get_close_matches(d.dataset, DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"data.dataset={d.dataset!r} is not known; use one of {list(DATASETS)}.{hint}")
    if d.dataset == "synthetic":
        from agcnn.data.synthetic import ensure_phantoms

        check_label_names(labels, source="phantom")
        table_path = ensure_phantoms(d.root, count=d.synthetic_count, size=d.synthetic_size, seed=d.synthetic_seed)
        return load_table(table_path, labels, path_column="path", patient_column="patient", views=d.views,
                          val_fraction=d.val_fraction, test_fraction=d.test_fraction, split_seed=d.split_seed)
    if d.dataset == "chestxray14":
        check_label_names(labels)
        return load_chestxray14(d.root, metadata=d.metadata, train_list=d.train_list, val_list=d.val_list, test_list=d.test_list,
                                labels=labels, views=d.views, val_fraction=d.val_fraction, split_seed=d.split_seed)
    table_path = d.metadata or str(Path(d.root) / "labels.csv")
    return load_table(table_path, labels, path_column=d.path_column, patient_column=d.patient_column, label_map=d.label_map,
                      views=d.views, val_fraction=d.val_fraction, test_fraction=d.test_fraction, split_seed=d.split_seed)


def build_datasets(cfg, splits: Sequence[str] = SPLITS, *, table: pd.DataFrame | None = None,
                   training: bool = False, stored: bool = False, config_path: str | None = None) -> dict[str, XrayDataset]:
    """Datasets for ``splits`` from ``cfg``; training transforms on "train" only.

    Images come from the preprocessing cache (first checked against the table, see
    :mod:`agcnn.data.cache`) when ``data.cache`` is set, and for ChestX-ray14 from its default
    cache: required when ``training`` (an error names the ``agcnn prepare`` command), used
    when present otherwise. ``stored``: items hold the image as stored (uint8 squares of
    ``data.cache_size``, see :class:`XrayDataset`), for :mod:`agcnn.data.device_transforms`.
    """
    from agcnn.data.cache import cache_folder, require_cache
    from agcnn.data.transforms import transforms_from_config

    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown splits {bad}; use some of {list(SPLITS)}")
    # The table first: a missing label file or split list is the more basic problem.
    table = load_dataframe(cfg) if table is None else table
    folder = require_cache(cfg.data, config_path) if training else cache_folder(cfg.data)
    if folder is not None and not cfg.data.cache and not (folder / "meta.json").is_file():
        folder = None  # the default ChestX-ray14 cache, absent: outside training, decode the originals
    cache = ImageCache(folder) if folder is not None else None
    out = {}
    for split in splits:
        part = table[table["split"] == split].reset_index(drop=True)
        if len(part) == 0:
            log.warning("the %s split is empty", split)
        rows = cache.verify(part["path"].tolist(), cfg.data.root, size=cfg.data.cache_size) if cache is not None else None
        out[split] = XrayDataset(
            part, cfg.labels, root=cfg.data.root, cache=cache, cache_rows=rows, name=split,
            skip_unreadable=cfg.data.skip_unreadable, scope=scope_policy(cfg.data),
            transform=None if stored else transforms_from_config(cfg.data, train=split == "train"),
            stored_size=cfg.data.cache_size if stored else None,
        )
        if stored:
            from agcnn.data.device_transforms import DeviceTransform

            # Applied by the training loop to each batch on its device (agcnn.train.loaders.model_input).
            out[split].batch_transform = DeviceTransform.from_config(cfg.data, train=split == "train")
    return out
