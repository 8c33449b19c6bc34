"""The input folder as a sorted list of relative paths, and which share each path belongs to.

Symbolic links are followed with loops and duplicates detected; entries that can never be
decoded (broken links, pipes, folders that cannot be listed) get their row here, unopened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field


def shard_of(relpath: str, n: int) -> int:
    """The share (0..n-1) of a relative path: a hash of the path alone, stable across runs."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n


@dataclass
class Listing:
    """Relative paths of every file under the input, sorted, plus rows decided while listing."""

    paths: list[str]
    # Entries that get a row without being decoded: broken links, pipes, unlistable folders.
    decided: dict[str, tuple[str, str]] = field(default_factory=dict)
    duplicates: int = 0  # files reached more than once through symbolic links (listed once)
    loops: int = 0  # directories reached again through symbolic links (not descended twice)

    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()


def list_files(root: str | os.PathLike[str], *, exclude: Sequence[str | os.PathLike[str]] = ()) -> Listing:
    """Every non-directory entry under ``root``, as sorted ``/``-separated relative paths.

    Symbolic links are followed; a directory already visited (same device and inode, e.g. a
    link back to a parent) is not entered again, and a file reached under two names is listed
    once, under the name that involves no link (else the first in sorted order). Pipes,
    sockets and devices are listed but never opened (opening a FIFO blocks). Directories in
    ``exclude`` (the output folder, when it lies inside the input) are not entered.
    """
    root = os.fspath(root)
    visited: set[tuple[int, int]] = set()
    for path in (root, *map(os.fspath, exclude)):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            visited.add((st.st_dev, st.st_ino))
    # (dev, ino) -> (via_link, relpath): the preferred name of each file.
    files: dict[tuple[int, int], tuple[bool, str]] = {}
    decided: dict[str, tuple[str, str]] = {}
    duplicates = loops = 0
    linked_dirs: set[str] = set()  # relative dirs reached through a link somewhere above
    # Folders that lie under the root without any link: a link to one of them is skipped, so
    # their files are listed under the real name even when the link sorts (or sits) first.
    real_dirs: set[tuple[int, int]] = set()
    for dirpath, _, _ in os.walk(root, followlinks=False):
        with contextlib.suppress(OSError):
            st = os.stat(dirpath)
            real_dirs.add((st.st_dev, st.st_ino))

    def on_error(err: OSError) -> None:
        # A subfolder that cannot be listed: its files are unknown, so say so in a row of its own.
        rel = _rel(err.filename, root) if err.filename else "."
        if rel != ".":
            decided[rel + "/"] = ("failed", f"unreadable: folder cannot be listed ({err.strerror}); its files were not seen")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        rel_dir = _rel(dirpath, root)
        dir_linked = rel_dir in linked_dirs
        keep = []
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                decided[_join(rel_dir, name)] = ("failed", "unreadable: broken symbolic link (its target is missing)")
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited or (os.path.islink(full) and key in real_dirs):
                loops += 1
                continue
            visited.add(key)
            if dir_linked or os.path.islink(full):
                linked_dirs.add(_join(rel_dir, name))
            keep.append(name)
        dirnames[:] = keep  # os.walk descends only into these, in this (sorted) order
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = _join(rel_dir, name)
            try:
                st = os.stat(full)
            except OSError:
                decided[rel] = ("failed", "unreadable: broken symbolic link (its target is missing)")
                continue
            if not stat.S_ISREG(st.st_mode):
                decided[rel] = ("skipped", "not_an_image: not a regular file (a pipe, socket or device); not opened")
                continue
            key = (st.st_dev, st.st_ino)
            via_link = dir_linked or os.path.islink(full)
            if key in files:
                duplicates += 1
                if (via_link, rel) < files[key]:
                    files[key] = (via_link, rel)
                continue
            files[key] = (via_link, rel)
    paths = sorted({rel for _, rel in files.values()} | set(decided))
    return Listing(paths=paths, decided=decided, duplicates=duplicates, loops=loops)


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return "." if rel == os.curdir else rel.replace(os.sep, "/")


def _join(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{rel_dir}/{name}"

