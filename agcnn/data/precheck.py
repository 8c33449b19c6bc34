"""Before the first step: every row of the data table names a file that exists and starts like an image.

Training on ChestX-ray14 reads 112,120 files per epoch; one HTML error page saved as ``.png``
would otherwise stop the run when the loader reaches its row, hours in. :func:`find_problems`
reads the first few hundred bytes of every file (the PNG / JPEG signature, DICOM's "DICM" at
byte 128 or a plausible preamble-less start; :func:`agcnn.data.readers.check_header`) with a
pool of threads, and lists every problem at once. A DICOM file's header is read too (not its
pixels), for what the reader refuses before decoding: another modality, and another body part
or a lateral view (``data.any_body_part`` / ``data.any_view``, :mod:`agcnn.data.scope`).
With ``data.cache`` set the images come from
the cache: the files there are checked by the cache itself, and the rows ``agcnn prepare`` could
not decode are the problems.

It is a check of the headers, not of the pixels: a file cut short after a valid header passes
here and fails when decoded (see ``data.skip_unreadable``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agcnn.errors import DataError

log = logging.getLogger(__name__)

# How many problems a message lists before "... and N more".
SHOWN = 20
# Threads reading headers: the work is waiting on the disk (or a network share), not the CPU.
THREADS = 16
# Files per task handed to a thread (one task per file would cost more than reading its header).
CHUNK = 512


@dataclass(frozen=True)
class Problem:
    """One row whose image cannot be used: where it is and why."""

    split: str
    row: int  # position in its split, as in ImageLoadError's "row N of the train set"
    path: str
    reason: str  # agcnn.data.readers.REASONS code, or the cache's
    message: str

    def line(self) -> str:
        return f"{self.path!r} (row {self.row} of the {self.split} set): {self.message}"


def listing(problems: list[Problem]) -> str:
    """The first :data:`SHOWN` problems, one indented line each, and how many more there are."""
    shown = "".join(f"\n  {p.line()}" for p in problems[:SHOWN])
    return shown + (f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")


class UnreadableImagesError(DataError):
    """Rows of the data table whose files are missing or not images; all of them, listed once."""

    def __init__(self, problems: list[Problem], total: int):
        self.problems, self.total = problems, total
        super().__init__(
            f"{len(problems)} of {total} images in the data table cannot be used:{listing(problems)}\n"
            f"Fix or remove these rows (or data.root), or set data.skip_unreadable=true to leave them out"
        )


def _check_files(paths: list[str], scope=None) -> list[tuple[str, str] | None]:
    """``(reason, message)`` for each file that is not usable, None for the others."""
    from agcnn.data.readers import UnusableImageError, check_header
    from agcnn.data.scope import OVERRIDES

    out: list[tuple[str, str] | None] = []
    for path in paths:
        try:
            check_header(path, scope=scope)
            out.append(None)
        except UnusableImageError as e:
            hint = f" (data.{OVERRIDES[e.reason]}: true trains on it anyway)" if e.reason in OVERRIDES else ""
            out.append((e.reason, f"{e}{hint}"))
    return out


def find_problems(dataset, *, threads: int = THREADS) -> list[Problem]:
    """Every row of ``dataset`` (an :class:`~agcnn.data.datasets.XrayDataset`) whose image
    cannot be used, in row order."""
    if dataset.cache is not None:
        bad = dataset.cache.unusable
        return [Problem(dataset.name, i, p, "unusable_in_cache", f"{bad[p]} (recorded by agcnn prepare)")
                for i, p in enumerate(dataset.paths) if p in bad]
    # os.path.join keeps an absolute table path as it is, like agcnn.data.cache.resolve.
    root = os.fspath(dataset.root)
    files = [os.path.join(root, p) for p in dataset.paths]
    chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        scope = getattr(dataset, "scope", None)
        found = [r for part in pool.map(lambda c: _check_files(c, scope), chunks) for r in part]
    return [Problem(dataset.name, i, p, *r) for i, (p, r) in enumerate(zip(dataset.paths, found)) if r is not None]


def check_datasets(datasets: Mapping[str, object], *, skip_unreadable: bool = False,
                   threads: int = THREADS) -> tuple[dict[str, object], list[Problem], int]:
    """Check every split; raise :class:`UnreadableImagesError` listing the problems, or with
    ``skip_unreadable`` return the datasets without those rows. Returns the datasets, the
    problems (to count) and how many rows were checked.

    Entries that are not table-backed datasets (e.g. a caller's own ``Dataset``) pass unchecked.
    """
    problems: list[Problem] = []
    total = 0
    for ds in datasets.values():
        if hasattr(ds, "paths") and hasattr(ds, "cache"):
            problems += find_problems(ds, threads=threads)
            total += len(ds)
    if not problems:
        return dict(datasets), [], total
    if not skip_unreadable:
        raise UnreadableImagesError(problems, total)
    log.warning("leaving out %d of %d images that cannot be used (data.skip_unreadable):%s", len(problems), total,
                listing(problems))
    out = {}
    for name, ds in datasets.items():
        bad = {p.row for p in problems if p.split == getattr(ds, "name", None)}
        out[name] = ds.without_rows(bad) if bad else ds
    return out, problems, total

