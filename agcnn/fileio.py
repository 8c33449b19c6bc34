"""File helpers shared by every writer: hashing, atomic writes, fsync, timestamps.

Standard library only, so any module may import it (labels, config, models, checkpoint and the
commands alike).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (provenance of checkpoints and weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write a file through ``write(fileobj)`` into a temporary sibling, fsync, then rename.

    A reader (or a kill -9) never sees a half-written file at ``path``.
    """
    with atomic_write(path) as f:
        write(f)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "w", newline="") as f:`` -- the file appears at ``path`` (fsynced,
    by one rename) only when the block ends without an error; otherwise the old file stays.

    The one temp-file-and-rename of the package: every file a reader may see half-written goes
    through it. ``mode`` is ``wb`` or ``w``; ``open_kwargs`` go to :func:`open` (encoding, ...).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode {mode!r}; use 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the mode an ordinary open() would (0666 less the
    # umask), so a container user or a colleague can read a checkpoint like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``path`` durable; best effort (not every filesystem can)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (``2026-01-31T12:00:00+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
