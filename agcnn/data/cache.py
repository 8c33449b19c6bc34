"""Preprocessing cache: every image decoded and resized once, read back as a memory map.

Decoding a 1024 px PNG or a compressed DICOM costs far more than the rest of the input pipeline,
and training reads every image once per epoch. ``agcnn prepare`` therefore writes, into the folder
``data.cache``:

* ``images.npy``: ``[N, S, S]`` uint8 (or uint16) with ``S = data.cache_size``, a plain ``.npy``
  file opened as a memory map. Each image is resized to S x S ignoring the aspect ratio, the same
  square resize the transforms start with (see :mod:`agcnn.data.transforms`), so cached and
  uncached training see the same field of view. Values are the reader's [0, 1] grey levels
  (bright = dense) scaled to the integer range.
* ``index.csv``: ``row, path, size, mtime_ns`` of every source file, with ``path`` spelled as in
  the data table (relative to ``data.root`` or absolute). Opening the cache checks the table's
  paths against it, and each file's size and modification time, so a cache built for other
  images, or from files that changed since, is refused with a message to rerun ``agcnn prepare``.
* ``status.npy``: one byte per image (0 pending, 1 done, 2 unusable) and ``unusable.csv`` with
  the reason for each unusable file. A file that cannot be decoded is reported and skipped; it does
  not stop the other images. The dataset raises an error naming it if training reaches it.
* ``meta.json``: size, dtype, count, format version.

The cache is written under ``<cache>.partial`` and renamed to ``<cache>`` only when no image is
pending, so a half-written cache is never mistaken for a complete one. A killed ``prepare`` resumes
from ``status.npy`` when rerun with the same image list.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from agcnn.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PENDING, DONE, UNUSABLE = 0, 1, 2
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


class CacheMismatchError(DataError):
    """The cache does not match the data table or the configuration; rerun ``agcnn prepare``."""


class UnusableCachedImage(Exception):
    """``agcnn prepare`` could not decode this image; ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class CacheReport:
    path: Path
    count: int
    decoded: int = 0
    reused: int = 0
    unusable: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0


def resolve(path: str, root: str | Path) -> Path:
    """A table path: absolute as is, otherwise relative to ``data.root``."""
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def cache_folder(data_cfg) -> Path | None:
    """The cache images are read from: ``data.cache``; unset, for ChestX-ray14 (unless
    ``data.decode_originals``) ``<data.root>/agcnn-cache-<data.cache_size>``, where ``agcnn prepare``
    writes by default. Decoding the 1024 px PNGs gives ~34 images/s per CPU core against the
    1-2 thousand a GPU trains on; the cache is read at ~1,300 (``docs/benchmarks.md``)."""
    if data_cfg.cache:
        return Path(data_cfg.cache)
    if data_cfg.dataset == "chestxray14" and not data_cfg.decode_originals:
        return Path(data_cfg.root) / f"agcnn-cache-{data_cfg.cache_size}"
    return None


def require_cache(data_cfg, config_path: str | None = None) -> Path | None:
    """:func:`cache_folder`, with a message naming the command that builds it when it is absent."""
    from agcnn.errors import ConfigError

    folder = cache_folder(data_cfg)
    if folder is None or (folder / "meta.json").is_file() or data_cfg.cache:
        return folder  # an explicit data.cache that is absent: ImageCache says so
    cfg_arg = f"--config {config_path}" if config_path else "--config <your config>"
    raise ConfigError(
        f"ChestX-ray14 training reads its images from the preprocessing cache, and there is none at {str(folder)!r}. "
        f"Build it once (every image decoded and resized to {data_cfg.cache_size} px): `agcnn prepare {cfg_arg}`; "
        f"to keep it elsewhere add `--set data.cache=/fast/disk/nih{data_cfg.cache_size}` to both prepare and train. "
        f"Or decode the PNGs every epoch (about 34 images/s per CPU core, far below what a GPU trains on): "
        f"--set data.decode_originals=true"
    )


def source_index(paths: Sequence[str], root: str | Path) -> pd.DataFrame:
    """``path, size, mtime_ns`` of every source file; a missing file is an error that names it."""
    sizes, mtimes = [], []
    for p in paths:
        try:
            st = os.stat(resolve(p, root))
        except FileNotFoundError:
            raise MissingFileError(f"image {p!r} (from the data table) does not exist under data.root={str(root)!r}; fix the table or data.root") from None
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return pd.DataFrame({"path": list(paths), "size": sizes, "mtime_ns": mtimes})


def _same_index(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return len(a) == len(b) and all((a[c].to_numpy() == b[c].to_numpy()).all() for c in ("path", "size", "mtime_ns"))


def _read_index(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "index.csv", dtype={"path": str, "size": np.int64, "mtime_ns": np.int64}, keep_default_na=False)


def decode_resized(path: str | Path, size: int, dtype: str = "uint8", scope=None) -> np.ndarray:
    """Read one image and resize it to ``size`` x ``size`` integers (the cache's stored form).

    ``scope``: an :class:`agcnn.data.scope.ScopePolicy`; a DICOM image outside it is unusable.
    """
    import cv2

    from agcnn.data.readers import read_image

    img = read_image(path, scope=scope)
    # INTER_AREA averages when shrinking (no aliasing of rib edges); linear when enlarging.
    shrink = img.shape[0] >= size and img.shape[1] >= size
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    top = np.iinfo(DTYPES[dtype]).max
    return np.clip(np.rint(img * top), 0, top).astype(DTYPES[dtype])


def _decode_job(job: tuple) -> tuple[int, np.ndarray | None, str]:
    row, path, size, dtype, scope = job
    try:
        return row, decode_resized(path, size, dtype, scope), ""
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the other thousands
        # UnusableImageError carries a short code (.reason) and a human message (str).
        reason = f"{e.reason}: {e}" if getattr(e, "reason", None) else f"{type(e).__name__}: {e}"
        return row, None, reason


def build_cache(
    out: str | Path,
    paths: Sequence[str],
    root: str | Path,
    *,
    size: int = 512,
    dtype: str = "uint8",
    workers: int = 2,
    max_images: int | None = None,
    progress_every: float = 10.0,
    scope=None,
) -> CacheReport:
    """Write (or finish, or refresh) the cache for ``paths`` at ``out``.

    ``scope`` (a :class:`agcnn.data.scope.ScopePolicy`) makes DICOM images of another body part
    or view unusable, as in training without the cache.

    ``max_images`` stops after that many decodes and leaves a resumable ``<out>.partial``, as a
    killed run would. A complete cache for the same files is reused as it is.
    """
    if dtype not in DTYPES:
        raise DataError(f"cache dtype {dtype!r} is not supported; use one of {list(DTYPES)}")
    if size < 8:
        raise DataError(f"data.cache_size={size} is too small; use at least data.resize (e.g. 512)")
    start = time.monotonic()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    index = source_index(paths, root)
    if index["path"].duplicated().any():
        raise DataError(f"image {index['path'][index['path'].duplicated()].iloc[0]!r} appears twice in the data table; each image must be listed once")
    meta = {"version": FORMAT_VERSION, "size": size, "dtype": dtype, "count": len(index)}
    if scope is not None and (scope.any_body_part or scope.any_view):
        # Only when a check is off, so that caches written before the checks existed (of PNG
        # sets, which they do not affect) stay valid.
        meta["scope"] = {"any_body_part": scope.any_body_part, "any_view": scope.any_view}
    report = CacheReport(out, len(index))

    if (out / "meta.json").is_file():
        old = json.loads((out / "meta.json").read_text())
        if all(old.get(k) == v for k, v in meta.items()) and _same_index(_read_index(out), index):
            log.info("cache %s is up to date", out)
            report.reused, report.complete = len(index), True
            report.unusable = _read_unusable(out)
            return report

    _open_partial(partial, index, meta)
    status = np.load(partial / "status.npy", mmap_mode="r")
    todo = np.flatnonzero(status == PENDING)
    del status
    report.reused = len(index) - len(todo)
    if max_images is not None:
        todo = todo[:max_images]
    jobs = [(int(r), str(resolve(index["path"][r], root)), size, dtype, scope) for r in todo]
    log.info("decoding %d images into %s (%d already done)", len(jobs), partial, report.reused)
    _decode_into(partial, index, jobs, workers, report, progress_every)

    status = np.load(partial / "status.npy", mmap_mode="r")
    if (status == PENDING).any():
        report.seconds = time.monotonic() - start
        return report
    del status
    _publish(partial, out)
    report.complete = True
    report.unusable = _read_unusable(out)
    report.seconds = time.monotonic() - start
    return report


def _open_partial(partial: Path, index: pd.DataFrame, meta: dict) -> None:
    """``<cache>.partial`` for these images and settings: the one a killed run left, or a new one."""
    resume = False
    if (partial / "meta.json").is_file():
        old = json.loads((partial / "meta.json").read_text())
        resume = all(old.get(k) == v for k, v in meta.items()) and _same_index(_read_index(partial), index)
        if not resume:
            log.info("discarding %s: it was started for other images or settings", partial)
    if resume:
        return
    size = meta["size"]
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=DTYPES[meta["dtype"]], shape=(len(index), size, size)).flush()
    np.lib.format.open_memmap(partial / "status.npy", mode="w+", dtype=np.uint8, shape=(len(index),)).flush()
    index.rename_axis("row").to_csv(partial / "index.csv")
    (partial / "unusable.csv").write_text("row,path,reason\n")
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))


def _decode_into(partial: Path, index: pd.DataFrame, jobs: list[tuple], workers: int, report: CacheReport,
                 progress_every: float) -> None:
    """Decode ``jobs`` into the partial cache, in worker processes; each row's status as it lands."""
    images = np.load(partial / "images.npy", mmap_mode="r+")
    status = np.load(partial / "status.npy", mmap_mode="r+")
    with open(partial / "unusable.csv", "a", newline="") as bad_file:
        bad_csv = csv.writer(bad_file)
        # Spawned workers: the parent may hold torch / OpenMP threads that a fork would copy in a
        # locked state.
        pool = mp.get_context("spawn").Pool(workers) if workers > 0 and len(jobs) > 1 else None
        results = pool.imap_unordered(_decode_job, jobs, chunksize=8) if pool else map(_decode_job, jobs)
        last = time.monotonic()
        try:
            for n, (row, pixels, reason) in enumerate(results, 1):
                # The pixels are in the page cache before the status byte says "done", so a
                # killed process never leaves a row marked done with stale pixels.
                if pixels is None:
                    bad_csv.writerow([row, index["path"][row], reason])
                    bad_file.flush()
                    status[row] = UNUSABLE
                    log.warning("unusable image %s: %s", index["path"][row], reason)
                else:
                    images[row] = pixels
                    status[row] = DONE
                report.decoded += 1
                if time.monotonic() - last > progress_every:
                    last = time.monotonic()
                    log.info("cache: %d / %d images", report.reused + n, len(index))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            images.flush()
            status.flush()


def _publish(partial: Path, out: Path) -> None:
    """The complete folder appears under its final name in one rename."""
    if out.exists():
        stale = out.with_name(out.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(out, stale)
        os.replace(partial, out)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, out)


def _read_unusable(folder: Path) -> list[tuple[str, str]]:
    bad = pd.read_csv(folder / "unusable.csv", dtype=str, keep_default_na=False)
    return list(zip(bad["path"], bad["reason"]))


class ImageCache:
    """Read side of the cache. Opened lazily in each DataLoader worker (memory maps do not pickle)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            partial = self.folder.with_name(self.folder.name + ".partial")
            hint = " (an unfinished one exists; rerun `agcnn prepare` to finish it)" if partial.exists() else ""
            raise CacheMismatchError(f"no complete cache at data.cache={str(self.folder)!r}{hint}; run `agcnn prepare --config <your config>` first, or set data.cache to null")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("version") != FORMAT_VERSION:
            raise CacheMismatchError(f"cache {str(self.folder)!r} has format version {self.meta.get('version')}, this agcnn reads {FORMAT_VERSION}; rerun `agcnn prepare`")
        self.index = _read_index(self.folder)
        self.row_of = {p: i for i, p in enumerate(self.index["path"])}
        self.unusable = dict(_read_unusable(self.folder))
        self._images: np.ndarray | None = None
        self._top = float(np.iinfo(DTYPES[self.meta["dtype"]]).max)

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def verify(self, paths: Sequence[str], root: str | Path, *, size: int | None = None, check_files: bool = True) -> np.ndarray:
        """Rows of ``paths`` in the cache; :class:`CacheMismatchError` if the cache does not cover them."""
        fix = "rerun `agcnn prepare --config <your config>` to rebuild it"
        if size is not None and size != self.size:
            raise CacheMismatchError(f"cache {str(self.folder)!r} holds {self.size} px images but data.cache_size={size}; {fix}")
        missing = [p for p in paths if p not in self.row_of]
        if missing:
            raise CacheMismatchError(f"cache {str(self.folder)!r} was built for another image list: {len(missing)} of {len(paths)} images are not in it (e.g. {missing[0]!r}); {fix}")
        rows = np.array([self.row_of[p] for p in paths], dtype=np.int64)
        if check_files:
            now = source_index(paths, root)
            then = self.index.iloc[rows].reset_index(drop=True)
            changed = (now["size"].to_numpy() != then["size"].to_numpy()) | (now["mtime_ns"].to_numpy() != then["mtime_ns"].to_numpy())
            if changed.any():
                raise CacheMismatchError(
                    f"{int(changed.sum())} images changed since the cache {str(self.folder)!r} was written "
                    f"(size or modification time differ, e.g. {now['path'][np.flatnonzero(changed)[0]]!r}); {fix}"
                )
        return rows

    def read(self, row: int) -> np.ndarray:
        """One cached image as float32 ``[S, S]`` in [0, 1]."""
        return np.asarray(self.read_stored(row), dtype=np.float32) / self._top

    def read_stored(self, row: int) -> np.ndarray:
        """One cached image as stored: ``[S, S]`` uint8 or uint16 (a copy out of the memory map)."""
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        path = self.index["path"][row]
        if path in self.unusable:
            raise UnusableCachedImage(path, self.unusable[path])
        return np.array(self._images[row])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state
