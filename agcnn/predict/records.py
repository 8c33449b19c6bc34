"""Decoding: every listed file becomes a record -- an image for the model, or a status and reason.

This part runs in the DataLoader's worker processes. A file that cannot be used becomes a
record saying why (``skipped`` / ``failed`` with a reason code of
:data:`agcnn.data.readers.REASONS`), never an exception, so one bad file never stops a batch.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from agcnn import libmessages
from agcnn.data.scope import OVERRIDES

# Reason codes by status (agcnn.data.readers.REASONS). "skipped": the file is not a usable
# radiograph by its nature; "failed": it should have been one and could not be processed.
# out_of_scope / not_frontal: another body part, a lateral view (agcnn.data.scope).
SKIP_REASONS = frozenset({"not_an_image", "no_pixel_data", "unsupported_modality", "out_of_scope", "not_frontal"})
FAIL_REASONS = frozenset({"truncated", "decode_error", "unreadable", "implausible_size", "empty_file"})

IDENTIFIER_COLUMNS = ("PatientID", "AccessionNumber", "StudyDate")
UID_COLUMNS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")

# Longest side of the copy of the original kept for an overlay picture.
PREVIEW_SIDE = 512


class FileRecords:
    """Map-style dataset over relative paths; an item is a record, never an exception.

    A file that cannot be used becomes a record with its status and reason, so one bad file
    never stops a batch (and a worker never dies of it).
    """

    def __init__(self, root: str, paths: Sequence[str], decided: dict[str, tuple[str, str]], transform,
                 *, identifiers: bool, previews: bool, scope=None, headers: bool = False):
        self.root, self.paths, self.decided, self.transform = root, paths, decided, transform
        self.identifiers, self.previews, self.scope, self.headers = identifiers, previews, scope, headers

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel = self.paths[i]
        if rel in self.decided:
            status, reason = self.decided[rel]
            return {"path": rel, "status": status, "reason": reason}
        # The libraries' messages about this file travel with its record to the main process,
        # counted by kind (agcnn.libmessages): they can quote header values. A codec's own
        # output on stderr (a Rust panic and its backtrace) is kept and counted too.
        with libmessages.for_file(rel, merge=False, native=True) as messages:
            rec = load_record(os.path.join(self.root, rel), rel, self.transform, identifiers=self.identifiers,
                              previews=self.previews, scope=self.scope, headers=self.headers)
        if messages:
            rec["library_messages"] = dict(messages)
        return rec


def load_record(full: str, rel: str, transform, *, identifiers: bool = False, previews: bool = False, scope=None,
                headers: bool = False) -> dict[str, Any]:
    """Decode one file into a record: ``image`` (the model input) on success, else a reason.

    ``scope``: an :class:`agcnn.data.scope.ScopePolicy` (None: every radiograph is predicted).
    ``headers``: DICOM records also carry ``dicom_header``, the header the reader parsed, without
    pixels (for the DICOM results; it holds identifiers and never reaches a row).
    """
    import numpy as np
    import torch

    from agcnn.data import readers

    rec: dict[str, Any] = {"path": rel}
    try:
        pixels, info = readers.read_image_with_info(full, scope=scope)
        image = transform(torch.from_numpy(np.ascontiguousarray(pixels))[None])
    except readers.UnusableImageError as e:
        code = e.reason
        rec["status"] = "skipped" if code in SKIP_REASONS else "failed"
        rec["reason"] = f"{code}: {e}"
        if code in OVERRIDES:
            rec["reason"] += f" (--{OVERRIDES[code].replace('_', '-')} predicts it anyway)"
        if code in ("no_pixel_data", "unsupported_modality", "out_of_scope", "not_frontal"):
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
        rec.update(_identifier_columns(info.header))
    if previews:
        rec["preview"] = _preview(pixels)
    if headers and info.format == "dicom":
        rec["dicom_header"] = info.header
    return rec


def _identifier_columns(header) -> dict[str, Any]:
    """The identifier columns from the header the reader parsed (each file is parsed once)."""
    out: dict[str, Any] = {}
    for kw in IDENTIFIER_COLUMNS:
        try:
            v = header.get(kw) if header is not None else None
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert: no value
            v = None
        out[kw] = str(v) if v not in (None, "") else None
    return out


def take_library_messages(records: list[dict[str, Any]]) -> None:
    """Move the library messages the workers counted per record into this process's tally."""
    tally = libmessages.current()
    for rec in records:
        messages = rec.pop("library_messages", None)
        if messages and tally is not None:
            tally.add(messages, rec["path"])


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


def collate(records: list[dict[str, Any]]):
    """Stack the images of the usable records; pass every record (failures included) through."""
    import torch

    images = [r.pop("image") for r in records if r.get("status") == "ok"]
    return records, (torch.stack(images) if images else None)


def worker_init(_: int, parent: int | None = None) -> None:
    import torch

    if parent is not None:
        _die_with_parent(parent)
    # Each worker decodes one file at a time; intra-op threads would only fight the model.
    torch.set_num_threads(1)
    if libmessages.current() is None:
        # Not forked from a process that counts the libraries' messages (agcnn.libmessages):
        # keep them from the log at least, since they can quote header values.
        warnings.simplefilter("ignore")
        logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the main process dies (Linux; elsewhere a no-op).

    The DataLoader's own check notices a dead parent only every 5 s; a worker that outlives a
    ``kill -9`` of the main process by that long keeps decoding for nobody.
    """
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)
