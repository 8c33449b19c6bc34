"""``agcnn predict``: batch inference over a folder of DICOM / PNG / JPEG files.

    agcnn predict --checkpoint model.pt --input /data/export --output /data/out

Every file under ``--input`` (recursively, symbolic links followed, loops and duplicates
detected) gets exactly one row in ``OUT/predictions.csv`` and its JSON Lines twin
``OUT/predictions.jsonl``: ``ok`` with the probabilities, ``skipped`` when the file is not a
usable radiograph by its nature (not an image, no pixel data, CT / MR / ...), ``failed`` when
it looks like one but could not be processed (truncated, corrupt, unreadable, implausible size,
empty). The ``reason`` column holds a stable code (see :data:`agcnn.data.readers.REASONS`)
followed by a short message.

Columns, in order:

* ``path`` (relative to ``--input``, ``/``-separated), ``status``, ``reason``, ``format``,
  ``height``, ``width`` (the original image's pixel size);
* ``sop_instance_uid``, ``series_instance_uid``, ``study_instance_uid`` for DICOM files;
* with ``--include-identifiers``: ``PatientID``, ``AccessionNumber``, ``StudyDate``;
* one fusion probability per label, named by the label, in the checkpoint's label order;
* with ``--all-branches``: ``global_<label>`` and ``local_<label>``;
* ``box_x0, box_y0, box_x1, box_y1``: the attended region (paper Sec. 3.2) in the ORIGINAL
  image's pixels, x1 / y1 exclusive;
* ``call_<label>`` (0 / 1) when the checkpoint carries fusion operating points;
* ``notes``: what the reader did (``MONOCHROME1 inverted``, window applied, ...).

Privacy. No patient name, ID, birth date, accession number or other attribute of the DICOM
PS3.15 Annex E basic profile is written, neither to the outputs nor to the log, unless
``--include-identifiers`` is given. Two things are kept because results must be joined back to
the PACS: the Study / Series / SOP Instance UIDs (pseudonymous keys, but keys: whoever has the
PACS can resolve them) and the relative paths (folder names in an export can themselves be
patient names or IDs; ``manifest.json`` also records ``--input`` and ``--output`` as given).
Treat the output folder with the same care as the input when either applies.

Resuming. Each finished batch is appended to ``predictions.jsonl`` with one write and an
fsync, one complete JSON object per line. A re-run on the same output folder reads it back,
drops a trailing partial line left by a kill, and processes only the files without a row; so
after any interruption (even ``kill -9``) a re-run ends with exactly one row per file.
``predictions.csv`` and the sorted ``predictions.jsonl`` are rewritten atomically at the end.
A re-run with another checkpoint, or other column options, on the same folder is refused.

Scale-out. ``--shard K/N`` (or ``RANK`` / ``WORLD_SIZE`` under ``torchrun``) takes the files
whose relative path hashes to K modulo N -- a choice that depends on the path alone, so each
share is the same whatever the others see -- and writes ``OUT/shard-K-of-N/``;
``agcnn merge OUT`` joins the shares.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import stat
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

JOURNAL = "predictions.jsonl"
CSV_NAME = "predictions.csv"
MANIFEST = "manifest.json"
STATE = ".predict-state.json"
LOCK = ".predict.lock"
OVERLAYS = "overlays"
STATE_FORMAT = "agcnn-predict-state"

# Reason codes by status (agcnn.data.readers.REASONS). "skipped": the file is not a usable
# radiograph by its nature; "failed": it should have been one and could not be processed.
SKIP_REASONS = frozenset({"not_an_image", "no_pixel_data", "unsupported_modality"})
FAIL_REASONS = frozenset({"truncated", "decode_error", "unreadable", "implausible_size", "empty_file"})

IDENTIFIER_COLUMNS = ("PatientID", "AccessionNumber", "StudyDate")
UID_COLUMNS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")

# Longest side of the copy of the original kept for an overlay picture.
PREVIEW_SIDE = 512
# Batches each decoding worker prepares ahead of the model.
PREFETCH = 2

log = logging.getLogger("agcnn.predict")


class UsageError(Exception):
    """A problem with the command line or the folders, found before any work: exit status 2."""


# ---------------------------------------------------------------------- command line

def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; an argparse type (errors exit 2)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} is not of the form K/N, e.g. 0/4 (shares are numbered from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: K must be in 0..N-1 and N at least 1, e.g. 0/4 ... 3/4")
    return k, n


def _int_at_least(minimum: int, meaning: str = ""):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be at least {minimum}{meaning}")
        return v

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0, " (0 decodes in the main process)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Outputs: OUT/predictions.csv and .jsonl (one row per file), OUT/manifest.json, and with\n"
        "--overlays OUT/overlays/<path>.png. Exit status: 0 every usable file was predicted\n"
        "(skipped files are listed), 1 some usable files failed, 2 usage error (nothing done).\n"
        "Outputs hold no patient identifiers unless --include-identifiers; they do hold the\n"
        "relative paths and the DICOM Study/Series/SOP Instance UIDs (pseudonymous keys for\n"
        "joining results back to the PACS)."
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by `agcnn train`")
    parser.add_argument("--input", required=True, help="folder of DICOM / PNG / JPEG files (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the results; re-running on it resumes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available (default)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per model batch (default 32)")
    parser.add_argument(
        "--workers", type=_non_negative, default=min(4, os.cpu_count() or 1),
        help="decoding processes (default min(4, CPUs)); 0 decodes in the main process",
    )
    parser.add_argument("--overlays", action="store_true", help="write a heatmap / box / CAM picture per predicted image")
    parser.add_argument(
        "--include-identifiers", action="store_true",
        help="add PatientID, AccessionNumber and StudyDate columns (read from the DICOM header; off by default)",
    )
    parser.add_argument("--all-branches", action="store_true", help="also write the global and local branch probabilities")
    parser.add_argument(
        "--shard", type=parse_shard, default=None, metavar="K/N",
        help="process share K of N (0-based) into OUT/shard-K-of-N/; set from RANK/WORLD_SIZE under torchrun",
    )


def run(args: argparse.Namespace) -> int:
    try:
        summary = predict_folder(
            args.checkpoint,
            args.input,
            args.output,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            overlays=args.overlays,
            include_identifiers=args.include_identifiers,
            all_branches=args.all_branches,
            shard=args.shard,
        )
    except UsageError as e:
        print(f"agcnn predict: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.line(), file=sys.stderr)
    return EXIT_FAILED if summary.counts.get("failed", 0) else EXIT_OK


# ---------------------------------------------------------------------- listing the input

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


# ---------------------------------------------------------------------- geometry

def box_to_original(
    box: Sequence[int], *, height: int, width: int, resize: int, image_size: int, highres_size: int
) -> tuple[int, int, int, int]:
    """Map a box on the global-input grid back to the original image's pixels.

    The evaluation transform (:func:`agcnn.data.transforms.build_transform`) resizes the image
    to a ``first x first`` square, centre-crops ``highres_size`` (offset as torchvision's
    ``center_crop``: ``round((first - side) / 2)``), and the model sees that crop at
    ``image_size``. Undo the three steps; resized pixel i covers original pixels
    [i * W / first, (i + 1) * W / first). The box is widened to whole pixels (floor / ceil),
    x1 / y1 exclusive, clipped to the image.
    """
    from agcnn.data.transforms import scaled_resize

    first = scaled_resize(resize, image_size, highres_size)
    offset = int(round((first - highres_size) / 2.0))
    s = highres_size / image_size
    x0, y0, x1, y1 = (float(v) for v in box)

    def to_orig(v: float, full: int) -> float:
        return (v * s + offset) * full / first

    # A small tolerance so that exact integers are not pushed out by float rounding.
    ox0 = max(0, math.floor(to_orig(x0, width) + 1e-6))
    oy0 = max(0, math.floor(to_orig(y0, height) + 1e-6))
    ox1 = min(width, math.ceil(to_orig(x1, width) - 1e-6))
    oy1 = min(height, math.ceil(to_orig(y1, height) - 1e-6))
    return ox0, oy0, max(ox1, ox0 + 1), max(oy1, oy0 + 1)


# ---------------------------------------------------------------------- decoding (in workers)

class _Files:
    """Map-style dataset over relative paths; an item is a record, never an exception.

    A file that cannot be used becomes a record with its status and reason, so one bad file
    never stops a batch (and a worker never dies of it).
    """

    def __init__(self, root: str, paths: Sequence[str], decided: dict[str, tuple[str, str]], transform,
                 *, identifiers: bool, previews: bool):
        self.root, self.paths, self.decided, self.transform = root, paths, decided, transform
        self.identifiers, self.previews = identifiers, previews

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel = self.paths[i]
        if rel in self.decided:
            status, reason = self.decided[rel]
            return {"path": rel, "status": status, "reason": reason}
        return load_record(os.path.join(self.root, rel), rel, self.transform, identifiers=self.identifiers, previews=self.previews)


def load_record(full: str, rel: str, transform, *, identifiers: bool = False, previews: bool = False) -> dict[str, Any]:
    """Decode one file into a record: ``image`` (the model input) on success, else a reason."""
    import numpy as np
    import torch

    from agcnn.data import readers

    rec: dict[str, Any] = {"path": rel}
    try:
        pixels, info = readers.read_image_with_info(full)
        image = transform(torch.from_numpy(np.ascontiguousarray(pixels))[None])
    except readers.UnusableImageError as e:
        code = e.reason
        rec["status"] = "skipped" if code in SKIP_REASONS else "failed"
        rec["reason"] = f"{code}: {e}"
        if code in ("no_pixel_data", "unsupported_modality"):
            # A DICOM object that is not a radiograph: still give its UIDs, so it can be found.
            rec.update(_dicom_header(full, identifiers=identifiers))
        return rec
    except Exception as e:  # noqa: BLE001 - the transform on an odd array; never fatal to the others
        rec["status"], rec["reason"] = "failed", f"decode_error: preprocessing failed ({type(e).__name__})"
        return rec
    rec.update(status="ok", reason="", image=image, format=info.format, height=int(info.height), width=int(info.width),
               notes="; ".join(info.notes))
    rec.update(sop_instance_uid=info.sop_instance_uid, series_instance_uid=info.series_instance_uid,
               study_instance_uid=info.study_instance_uid)
    if identifiers and info.format == "dicom":
        rec.update({k: v for k, v in _dicom_header(full, identifiers=True).items() if k in IDENTIFIER_COLUMNS})
    if previews:
        rec["preview"] = _preview(pixels)
    return rec


def _dicom_header(full: str, *, identifiers: bool) -> dict[str, Any]:
    """UIDs (and, when asked, the identifier columns) from the header alone; {} if unreadable."""
    import pydicom

    keywords = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
    if identifiers:
        keywords += list(IDENTIFIER_COLUMNS)
    try:
        with warnings.catch_warnings():
            # Parser warnings can quote element values; none may reach the log.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(full, stop_before_pixels=True, specific_tags=keywords, force=True)
    except Exception:  # noqa: BLE001 - best effort: the row already has its reason
        return {}
    out: dict[str, Any] = {}
    for kw, col in zip(keywords[:3], UID_COLUMNS):
        v = ds.get(kw)
        out[col] = str(v) if v else None
    for kw in keywords[3:]:
        v = ds.get(kw)
        out[kw] = str(v) if v not in (None, "") else None
    return out


def _preview(pixels) -> Any:
    """A uint8 copy of the original, longest side at most PREVIEW_SIDE, for the overlay."""
    import torch
    import torch.nn.functional as F

    h, w = pixels.shape
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    t = torch.from_numpy(pixels)[None, None]
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (t[0, 0].clamp(0, 1) * 255).round().to(torch.uint8)


def _collate(records: list[dict[str, Any]]):
    """Stack the images of the usable records; pass every record (failures included) through."""
    import torch

    images = [r.pop("image") for r in records if r.get("status") == "ok"]
    return records, (torch.stack(images) if images else None)


def _worker_init(_: int) -> None:
    import torch

    # Each worker decodes one file at a time; intra-op threads would only fight the model.
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


# ---------------------------------------------------------------------- the journal

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
            _fsync_dir(path.parent)

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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)


def write_tables(journals: Sequence[Path], out_dir: Path, columns: Sequence[str]) -> Counter:
    """Rewrite ``predictions.jsonl`` and ``predictions.csv`` in ``out_dir``, sorted by path.

    Reads the journal(s) twice -- once for (path, offset) pairs, once row by row in sorted
    order -- so memory holds paths only. Both files are replaced atomically. Returns the counts
    by ``status`` and by ``status:reason_code``. A path found twice raises ValueError.
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
    tmp_jsonl = out_dir / f".{JOURNAL}.tmp"
    tmp_csv = out_dir / f".{CSV_NAME}.tmp"
    try:
        with open(tmp_jsonl, "wb") as fj, open(tmp_csv, "w", newline="", encoding="utf-8", errors="surrogateescape") as fc:
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
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            for f in (fj, fc):
                f.flush()
                os.fsync(f.fileno())
    finally:
        for h in handles:
            h.close()
    os.replace(tmp_jsonl, out_dir / JOURNAL)
    os.replace(tmp_csv, out_dir / CSV_NAME)
    _fsync_dir(out_dir)
    return counts


# ---------------------------------------------------------------------- the run

@dataclass
class Summary:
    out_dir: Path
    counts: Counter
    new_rows: int
    seconds: float  # of the decode + predict loop, without start-up

    def line(self) -> str:
        total = self.counts.get("ok", 0) + self.counts.get("skipped", 0) + self.counts.get("failed", 0)
        reasons = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(self.counts.items()) if ":" in k)
        rate = self.new_rows / self.seconds if self.seconds > 0 else 0.0
        return (
            f"agcnn predict: {total} files: {self.counts.get('ok', 0)} ok, {self.counts.get('skipped', 0)} skipped, "
            f"{self.counts.get('failed', 0)} failed" + (f" ({reasons})" if reasons else "")
            + f"; {self.new_rows} processed in this run at {rate:.1f} files/s -> {self.out_dir / CSV_NAME}"
        )


def columns_for(labels: Sequence[str], *, identifiers: bool, all_branches: bool, calls: bool) -> list[str]:
    cols = ["path", "status", "reason", "format", "height", "width", *UID_COLUMNS]
    if identifiers:
        cols += list(IDENTIFIER_COLUMNS)
    cols += list(labels)
    if all_branches:
        cols += [f"global_{c}" for c in labels] + [f"local_{c}" for c in labels]
    cols += list(BOX_COLUMNS)
    if calls:
        cols += [f"call_{c}" for c in labels]
    cols.append("notes")
    return cols


def _shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when started by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UsageError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    return rank, world


def _resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is visible to PyTorch; use --device cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UsageError(f"--output {str(folder)!r} exists and is not a folder; pass a folder path") from None
    except OSError as e:
        raise UsageError(f"--output {str(folder)!r} is not writable ({e.strerror}); pass a folder this user can write to") from None


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "torchvision", "numpy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                 "python-gdcm", "pillow", "opencv-python-headless", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _prob(v: float) -> float | None:
    """The shortest decimal that round-trips the float32 value; None for NaN / inf."""
    import numpy as np

    return float(str(np.float32(v))) if math.isfinite(v) else None


@contextlib.contextmanager
def _quiet_pydicom():
    """No pydicom warning or log record in this process: they can quote identifying values."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        try:
            yield
        finally:
            logger.setLevel(level)


def predict_folder(
    checkpoint: str | os.PathLike[str],
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    overlays: bool = False,
    include_identifiers: bool = False,
    all_branches: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Summary:
    """Predict every file under ``input_dir`` into ``output_dir`` (see the module docstring).

    Raises :class:`UsageError` for problems found before any work (nothing is written then,
    except the output folder itself when it had to be created).
    """
    started, t0 = _utc_now(), time.perf_counter()
    # ---- checks that need nothing written
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    if workers < 0:
        raise UsageError(f"--workers {workers} must be 0 or more")
    in_dir = Path(input_dir)
    if not in_dir.exists():
        raise UsageError(f"--input {str(in_dir)!r} does not exist; pass the folder holding the images")
    if not in_dir.is_dir():
        raise UsageError(f"--input {str(in_dir)!r} is a file; pass the folder that holds it")
    if not os.access(in_dir, os.R_OK | os.X_OK):
        raise UsageError(f"--input {str(in_dir)!r} cannot be listed (permission denied); give this user read access")
    out_top = Path(output_dir)
    if out_top.exists() and out_top.resolve() == in_dir.resolve():
        raise UsageError(f"--output {str(out_top)!r} is the input folder; pass a separate folder (it may lie inside the input)")
    if shard is None:
        shard = _shard_from_env()

    from agcnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, sha256_file, trained_branches

    try:
        ckpt = load_checkpoint(checkpoint)
        trained = trained_branches(ckpt)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # label list / config problems inside an agcnn checkpoint
        raise UsageError(f"checkpoint {str(checkpoint)!r}: {e}") from None
    if "fusion" not in trained:
        # Its fusion head (and for stage I its local branch) still holds random weights.
        raise UsageError(
            f"checkpoint {str(checkpoint)!r} is from the {ckpt.get('stage')} stage, whose fusion head is untrained; "
            f"predict with the fusion stage's checkpoint (RUN_DIR/fusion/best.pt)"
        )
    try:
        model, cfg = model_from_checkpoint(ckpt)
    except Exception as e:  # noqa: BLE001 - weights that do not fit the stored config
        raise UsageError(f"checkpoint {str(checkpoint)!r} does not rebuild a model ({type(e).__name__}: {e}); re-export it with `agcnn train`") from None
    labels = list(ckpt["labels"])
    thresholds = (ckpt.get("operating_points") or {}).get("fusion")
    if thresholds is not None and len(thresholds) != len(labels):
        raise UsageError(
            f"checkpoint {str(checkpoint)!r} has {len(thresholds)} fusion operating points for {len(labels)} labels; "
            f"re-run the operating-point selection"
        )
    torch_device = _resolve_device(device)
    ckpt_sha = sha256_file(checkpoint)
    del ckpt

    # ---- the output folder
    out_dir = out_top / f"shard-{shard[0]}-of-{shard[1]}" if shard else out_top
    _check_writable(out_dir)
    columns = columns_for(labels, identifiers=include_identifiers, all_branches=all_branches, calls=thresholds is not None)
    options = {"include_identifiers": include_identifiers, "all_branches": all_branches, "overlays": overlays}
    lock = _lock(out_dir)
    try:
        state = {
            "format": STATE_FORMAT, "version": 1, "checkpoint_sha256": ckpt_sha, "labels": labels,
            "options": options, "shard": list(shard) if shard else None, "columns": columns,
        }
        _check_state(out_dir, state)
        journal = Journal(out_dir / JOURNAL)
        try:
            return _run(
                model=model, cfg=cfg, labels=labels, thresholds=thresholds, device=torch_device, in_dir=in_dir,
                out_top=out_top, out_dir=out_dir, journal=journal, columns=columns, options=options, shard=shard,
                batch_size=batch_size, workers=workers, progress=progress, started=started, t0=t0,
                manifest_base={
                    "checkpoint": {"path": str(checkpoint), "sha256": ckpt_sha},
                    "arguments": {
                        "checkpoint": str(checkpoint), "input": str(input_dir), "output": str(output_dir),
                        "device": device, "batch_size": batch_size, "workers": workers, **options,
                        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
                    },
                },
            )
        finally:
            journal.close()
    finally:
        lock.close()


def _lock(out_dir: Path):
    import fcntl

    f = open(out_dir / LOCK, "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"another `agcnn predict` is writing to {str(out_dir)!r}; wait for it or use another --output") from None
    return f


def _check_state(out_dir: Path, state: dict[str, Any]) -> None:
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
            if old.get("options", {}).get(opt) != value:
                flag = "--" + opt.replace("_", "-")
                was = "with" if old.get("options", {}).get(opt) else "without"
                raise UsageError(
                    f"{str(out_dir)!r} was started {was} {flag}; resume with the same options, or use a new --output folder"
                )
        return
    if (out_dir / JOURNAL).exists():
        raise UsageError(f"{str(out_dir)!r} holds a {JOURNAL} not written by `agcnn predict`; use a new --output folder")
    from agcnn.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write(json.dumps(state, indent=1).encode()))


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    from agcnn.checkpoint import atomic_write_bytes

    atomic_write_bytes(out_dir / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1, default=str) + "\n").encode()))


def _run(*, model, cfg, labels, thresholds, device, in_dir, out_top, out_dir, journal, columns, options, shard,
         batch_size, workers, progress, started, t0, manifest_base) -> Summary:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    import agcnn
    from agcnn.data.transforms import transforms_from_config

    listing = list_files(in_dir, exclude=[out_top])
    all_paths = listing.paths
    mine = [p for p in all_paths if shard is None or shard_of(p, shard[1]) == shard[0]]
    pending = [p for p in mine if p not in journal.done]
    del all_paths

    manifest = {
        "agcnn_version": agcnn.__version__,
        **manifest_base,
        "labels": labels,
        "config": cfg.to_dict(),
        "operating_points": {"fusion": thresholds} if thresholds is not None else None,
        "columns": columns,
        "versions": _library_versions(),
        "device": _device_name(device),
        "listing": {"files": len(listing.paths), "sha256": listing.digest(), "duplicates_via_links": listing.duplicates,
                    "directory_loops": listing.loops},
        "share": {"k": shard[0], "n": shard[1], "files": len(mine)} if shard else None,
        "resumed_rows": len(journal.done),
        "started": started,
        "complete": False,
    }
    _write_manifest(out_dir, manifest)

    model.eval().to(device).to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    threads_before = torch.get_num_threads()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to each decoding worker: oversubscribed OpenMP threads spin at their
        # barriers and slow the model several-fold (measured: 5x with 2 threads + 2 workers on
        # 2 busy cores). OMP_NUM_THREADS, when set, is the user's choice and is kept.
        torch.set_num_threads(max(1, _cpu_count() - workers))
    manifest["torch_threads"] = torch.get_num_threads()
    transform = transforms_from_config(cfg.data, train=False)
    def make_dataset(paths: Sequence[str]) -> _Files:
        return _Files(str(in_dir), paths, listing.decided, transform, identifiers=options["include_identifiers"],
                      previews=options["overlays"])

    def make_loader(paths: Sequence[str], n_workers: int, batch: int) -> DataLoader:
        return DataLoader(
            make_dataset(paths), batch_size=batch, shuffle=False, num_workers=n_workers, collate_fn=_collate,
            pin_memory=cuda, worker_init_fn=_worker_init if n_workers else None,
            prefetch_factor=PREFETCH if n_workers else None, persistent_workers=False,
        )

    geometry = {"resize": cfg.data.resize, "image_size": cfg.data.image_size, "highres_size": cfg.data.highres_size}
    fmap: dict[str, torch.Tensor] = {}
    hook = None
    if options["overlays"]:
        from agcnn import overlays as overlay_mod

        # The global feature map for the class activation maps, without a second forward pass.
        hook = model.global_branch.features.register_forward_hook(lambda m, i, o: fmap.__setitem__("g", o))
    thr = torch.tensor([float("nan") if t is None else float(t) for t in thresholds]) if thresholds is not None else None

    new_rows = 0
    t_loop = time.perf_counter()
    bar = tqdm(total=len(pending), unit="file", desc="predict", disable=not progress or not pending, dynamic_ncols=True,
               file=sys.stderr)
    counts: Counter = Counter()
    def handle(records: list[dict[str, Any]], images) -> None:
        nonlocal new_rows
        if images is not None:
            x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = model(x, stage="fusion")
            fusion = torch.sigmoid(out.fusion_logits.float()).cpu()
            glob = torch.sigmoid(out.global_logits.float()).cpu()
            local = torch.sigmoid(out.local_logits.float()).cpu()
            boxes = out.boxes.cpu()
            heat = out.heatmap.float().cpu() if options["overlays"] else None
            cams = None
            if options["overlays"]:
                top = fusion.argmax(dim=1)
                # CAM (Zhou et al. 2016): the top class's global classifier weights over the global feature map.
                w = model.global_branch.classifier.weight.float()[top.to(device)]
                cams = torch.relu(torch.einsum("bc,bchw->bhw", w, fmap["g"].float())).cpu()
        rows = []
        k = 0
        for rec in records:
            row = {c: None for c in columns}
            row.update({c: rec.get(c) for c in columns if c in rec})
            row["reason"] = rec.get("reason", "")
            if rec["status"] == "ok":
                p = fusion[k]
                for j, lab in enumerate(labels):
                    row[lab] = _prob(float(p[j]))
                if options["all_branches"]:
                    for j, lab in enumerate(labels):
                        row[f"global_{lab}"] = _prob(float(glob[k, j]))
                        row[f"local_{lab}"] = _prob(float(local[k, j]))
                box = box_to_original(boxes[k].tolist(), height=rec["height"], width=rec["width"], **geometry)
                row.update(zip(BOX_COLUMNS, box))
                if thr is not None:
                    for j, lab in enumerate(labels):
                        row[f"call_{lab}"] = None if math.isnan(thr[j]) else int(float(p[j]) >= float(thr[j]))
                if options["overlays"]:
                    crop = box_to_original([0, 0, cfg.data.image_size, cfg.data.image_size],
                                           height=rec["height"], width=rec["width"], **geometry)
                    j = int(p.argmax())
                    try:
                        overlay_mod.write_overlay(
                            out_dir / OVERLAYS / (rec["path"] + ".png"), preview=rec["preview"].numpy(),
                            height=rec["height"], width=rec["width"], box=box, field=crop,
                            heatmap=heat[k].numpy(), cam=cams[k].numpy(), finding=labels[j], probability=float(p[j]),
                        )
                    except OSError as e:
                        # A picture that cannot be written (name too long, disk full) must not
                        # cost the prediction, or stop the run at the same file on every re-run.
                        row["notes"] = "; ".join(filter(None, [row.get("notes"), f"overlay not written: {e.strerror or e}"]))
                k += 1
            rows.append(row)
            counts[rec["status"]] += 1
        journal.append(rows)
        new_rows += len(rows)
        bar.update(len(rows))
        bar.set_postfix(ok=counts["ok"], skipped=counts["skipped"], failed=counts["failed"], refresh=False)

    with _quiet_pydicom(), torch.inference_mode(), _restore_threads(threads_before):
        start = 0
        while start < len(pending):
            consumed = 0
            try:
                for records, images in make_loader(pending[start:], workers, batch_size):
                    handle(records, images)
                    consumed += len(records)
                break
            except RuntimeError as e:
                # A decoder that crashes its process (a segfault in a codec on a malformed file)
                # kills a worker; the loader then fails without saying which file did it. Decode
                # the batches that were in flight one file per process, so the culprit gets a
                # "failed" row and every other file its prediction, then carry on.
                if not workers or not _is_worker_death(e):
                    raise
                start += consumed
                window = pending[start : start + batch_size * (workers * PREFETCH + 1)]
                records = [_decode_isolated(make_loader, path) for path in window]
                for i in range(0, len(records), batch_size):
                    handle(*_collate(records[i : i + batch_size]))
                start += len(window)
    bar.close()
    loop_seconds = time.perf_counter() - t_loop
    if hook is not None:
        hook.remove()

    total_counts = write_tables([journal.path], out_dir, columns)
    seconds = time.perf_counter() - t0
    manifest.update(
        finished=_utc_now(),
        seconds=round(seconds, 3),
        rows_this_run=new_rows,
        files_per_second=round(new_rows / loop_seconds, 3) if loop_seconds > 0 and new_rows else None,
        counts={k: v for k, v in sorted(total_counts.items()) if ":" not in k},
        reasons={k: v for k, v in sorted(total_counts.items()) if ":" in k},
        complete=True,
    )
    _write_manifest(out_dir, manifest)
    if not mine:
        log.warning("no files found under %s", in_dir)
    return Summary(out_dir=out_dir, counts=total_counts, new_rows=new_rows, seconds=loop_seconds)


@contextlib.contextmanager
def _restore_threads(n: int):
    import torch

    try:
        yield
    finally:
        torch.set_num_threads(n)


def _is_worker_death(e: BaseException) -> bool:
    msg = str(e)
    return "DataLoader worker" in msg and ("exited unexpectedly" in msg or "killed by signal" in msg)


def _decode_isolated(make_loader, path: str) -> dict[str, Any]:
    """Decode one file in a worker process of its own; a crash there names the file."""
    try:
        records, images = next(iter(make_loader([path], 1, 1)))
    except RuntimeError as e:
        if not _is_worker_death(e):
            raise
        return {"path": path, "status": "failed",
                "reason": "decode_error: the decoder crashed on this file (its process died); the file is probably corrupt"}
    rec = records[0]
    if images is not None:
        rec["image"] = images[0]  # back into the record, for the collate of the model batch
    return rec


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({_cpu_count()} cores)"
