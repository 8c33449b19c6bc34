"""The output folder: the journal of finished rows, the final tables, the state and the lock.

``predictions.jsonl`` is appended one batch at a time (one write and an fsync), so a killed run
loses at most the batch in flight; :func:`write_tables` rewrites it sorted, with its CSV twin,
atomically at the end. ``.predict-state.json`` pins the checkpoint and row options a resumed
run must share.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agcnn.errors import UsageError
from agcnn.fileio import atomic_write, atomic_write_bytes, fsync_dir
from agcnn.predict.outputs import COUNT_NOT_WRITTEN, COUNT_WRITTEN, DICOM_KEY, dicom_not_written

JOURNAL = "predictions.jsonl"
CSV_NAME = "predictions.csv"
MANIFEST = "manifest.json"
STATE = ".predict-state.json"
LOCK = ".predict.lock"
STATE_FORMAT = "agcnn-predict-state"


class Journal:
    """``predictions.jsonl`` as an append-only log of finished rows.

    One write + flush + fsync per batch, one complete JSON object per line. On open, a trailing
    partial line (a kill during a write) is cut off, so it can never be read as a result.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        self._recover()
        new = not path.exists()
        self._f = open(path, "ab")
        if new:
            fsync_dir(path.parent)

    def _recover(self) -> None:
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        with open(self.path, "rb+") as f:
            if size:
                # Find the last newline from the end without reading the whole file.
                end, block = size, 1 << 16
                keep = 0
                while end > 0:
                    start = max(0, end - block)
                    f.seek(start)
                    chunk = f.read(end - start)
                    nl = chunk.rfind(b"\n")
                    if nl >= 0:
                        keep = start + nl + 1
                        break
                    end = start
                if keep < size:
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    path = row["path"]
                except (ValueError, KeyError, TypeError):
                    raise UsageError(
                        f"line {lineno} of {self.path} is not a result row; the file was edited or damaged. "
                        f"Remove that line (its file will be processed again) or use a new --output folder"
                    ) from None
                self.done.add(path)

    def drop_failed(self, *, dicom: bool = False) -> list[str]:
        """Remove the ``failed`` rows (``--retry-failed``): their files are to be done again.

        ``dicom``: also the rows whose DICOM results could not be written (``--dicom-out``).

        The journal is rewritten without them (temporary file, fsync, rename), so a kill at
        any moment leaves either the old journal or the new one; returns the dropped paths.
        """
        self._f.close()

        def redo(row: dict[str, Any]) -> bool:
            return row.get("status") == "failed" or (dicom and dicom_not_written(row))

        dropped = [row["path"] for row in iter_rows(self.path) if redo(row)]
        if dropped:
            with open(self.path, "rb") as src, atomic_write(self.path) as dst:
                for line in src:
                    if not redo(json.loads(line)):
                        dst.write(line)
            fsync_dir(self.path.parent)
        self.done.difference_update(dropped)
        self._f = open(self.path, "ab")
        return dropped

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=True, separators=(",", ":")) + "\n" for r in rows).encode("ascii")
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.update(r["path"] for r in rows)

    def close(self) -> None:
        self._f.close()


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)


def write_tables(journals: Sequence[Path], out_dir: Path, columns: Sequence[str]) -> Counter:
    """Rewrite ``predictions.jsonl`` and ``predictions.csv`` in ``out_dir``, sorted by path.

    Reads the journal(s) twice -- once for (path, offset) pairs, once row by row in sorted
    order -- so memory holds paths only. Both files are replaced atomically. Returns the counts
    by ``status``, by ``status:reason_code`` and, for DICOM results, ``dicom written`` /
    ``dicom not_written``. A path found twice raises ValueError.
    """
    index: list[tuple[str, int, int]] = []
    for j, path in enumerate(journals):
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.endswith(b"\n"):
                    index.append((json.loads(line)["path"], j, offset))
                offset += len(line)
    index.sort()
    dups = sorted({a[0] for a, b in zip(index, index[1:]) if a[0] == b[0]})
    if dups:
        raise ValueError(f"{len(dups)} files have more than one row, e.g. {dups[:5]}")
    counts: Counter = Counter()
    handles = [open(p, "rb") for p in journals]
    try:
        # The journal is replaced first, then the table made from it (the inner block ends first).
        with atomic_write(out_dir / CSV_NAME, "w", newline="", encoding="utf-8", errors="surrogateescape") as fc, \
                atomic_write(out_dir / JOURNAL) as fj:
            writer = csv.DictWriter(fc, fieldnames=list(columns), restval="", extrasaction="ignore")
            writer.writeheader()
            for _, j, offset in index:
                handles[j].seek(offset)
                line = handles[j].readline()
                fj.write(line)
                row = json.loads(line)
                counts[row["status"]] += 1
                if row.get("reason"):
                    counts[f"{row['status']}:{row['reason'].split(':', 1)[0]}"] += 1
                if row.get(DICOM_KEY):
                    counts[COUNT_NOT_WRITTEN if dicom_not_written(row) else COUNT_WRITTEN] += 1
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    finally:
        for h in handles:
            h.close()
    fsync_dir(out_dir)
    return counts


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UsageError(f"--output {str(folder)!r} exists and is not a folder; pass a folder path") from None
    except OSError as e:
        raise UsageError(f"--output {str(folder)!r} is not writable ({e.strerror}); pass a folder this user can write to") from None


def lock_output(out_dir: Path):
    """Hold the output folder's lock; it belongs to this process alone and dies with it.

    A POSIX record lock (``lockf``), not ``flock``: an ``flock`` belongs to the open file,
    which the DataLoader's worker processes inherit when they are forked, so after a ``kill -9``
    of the main process the lock lived on in its workers for seconds and a restart was refused.
    Record locks are never inherited by a child and are released when their process ends.
    Nothing else in this process may open and close the lock file: closing any descriptor of
    it would drop the lock (POSIX semantics).
    """
    return hold_lock(out_dir / LOCK, f"another `agcnn predict` is writing to {str(out_dir)!r}; wait for it or use another --output")


def hold_lock(path: Path, busy: str):
    """This process's record lock on ``path`` (see :func:`lock_output`); :class:`UsageError`
    ``busy`` when another process holds it."""
    import fcntl

    f = open(path, "a")
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(busy) from None
    return f


def check_state(out_dir: Path, state: dict[str, Any]) -> None:
    path = out_dir / STATE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UsageError(f"{path} is damaged; delete it together with {JOURNAL} to start over") from None
        if old.get("checkpoint_sha256") != state["checkpoint_sha256"]:
            raise UsageError(
                f"{str(out_dir)!r} holds results of another checkpoint (sha256 {str(old.get('checkpoint_sha256'))[:12]}..., "
                f"this one is {state['checkpoint_sha256'][:12]}...); use a new --output folder, or resume with the "
                f"checkpoint that started it"
            )
        for key in ("labels", "shard"):
            if old.get(key) != state[key]:
                raise UsageError(f"{str(out_dir)!r} was started with {key} {old.get(key)}, not {state[key]}; use a new --output folder")
        for opt, value in state["options"].items():
            # An option newer than the folder's state was off when it was started.
            if old.get("options", {}).get(opt, False) != value:
                flag = "--" + opt.replace("_", "-")
                was = "with" if old.get("options", {}).get(opt) else "without"
                raise UsageError(
                    f"{str(out_dir)!r} was started {was} {flag}; resume with the same options, or use a new --output folder"
                )
        return
    if (out_dir / JOURNAL).exists():
        raise UsageError(f"{str(out_dir)!r} holds a {JOURNAL} not written by `agcnn predict`; use a new --output folder")
    atomic_write_bytes(path, lambda f: f.write(json.dumps(state, indent=1).encode()))


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1, default=str) + "\n").encode()))

