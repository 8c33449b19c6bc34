"""Decoding: every listed file becomes a record -- an image for the model, or a status and reason.

This part runs in the DataLoader's worker processes. A file that cannot be used becomes a
record saying why (``skipped`` / ``failed`` with a reason code of
:data:`agcnn.data.readers.REASONS`), never an exception, so one bad file never stops a batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

# Reason codes by status (agcnn.data.readers.REASONS). "skipped": the file is not a usable
# radiograph by its nature; "failed": it should have been one and could not be processed.
SKIP_REASONS = frozenset({"not_an_image", "no_pixel_data", "unsupported_modality"})
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


def collate(records: list[dict[str, Any]]):
    """Stack the images of the usable records; pass every record (failures included) through."""
    import torch

    images = [r.pop("image") for r in records if r.get("status") == "ok"]
    return records, (torch.stack(images) if images else None)


def worker_init(_: int) -> None:
    import torch

    # Each worker decodes one file at a time; intra-op threads would only fight the model.
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def quiet_pydicom():
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

