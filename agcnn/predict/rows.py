"""What a row of ``predictions.csv`` holds: its columns, and the rows of one batch.

:func:`build_rows` is a pure function of the decoded records and the model's probabilities,
so what a file's row says can be tested without a model, a loader or a folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agcnn.data.geometry import Geometry
from agcnn.predict.records import IDENTIFIER_COLUMNS, UID_COLUMNS

BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")


@dataclass
class BatchProbabilities:
    """The model's output for the usable images of one batch (CPU tensors, in batch order)."""

    fusion: Any  # [n, K] sigmoid probabilities
    global_: Any  # [n, K]
    local: Any  # [n, K]
    boxes: Any  # [n, 4] attended boxes on the global-input grid (x0, y0, x1, y1)


def build_rows(
    records: Sequence[Mapping[str, Any]],
    probs: BatchProbabilities | None,
    *,
    columns: Sequence[str],
    labels: Sequence[str],
    geometry: Geometry,
    thresholds: Any = None,
    all_branches: bool = False,
    calibration: str | None = None,
) -> list[dict[str, Any]]:
    """One row per record, in order; the ``ok`` records take the probabilities in turn.

    ``geometry``: the evaluation transform's (to map the box back to the original pixels,
    :meth:`agcnn.data.geometry.Geometry.to_original`); ``thresholds`` is a float tensor of fusion operating
    points per label (NaN: none for that label), or None for no ``call_`` columns.
    ``calibration``: the id of the calibration the probabilities carry, written to each ``ok`` row.
    """
    rows = []
    k = 0
    for rec in records:
        row: dict[str, Any] = {c: None for c in columns}
        row.update({c: rec.get(c) for c in columns if c in rec})
        row["reason"] = rec.get("reason", "")
        if rec["status"] == "ok":
            p = probs.fusion[k]
            for j, lab in enumerate(labels):
                row[lab] = probability(float(p[j]))
            if all_branches:
                for j, lab in enumerate(labels):
                    row[f"global_{lab}"] = probability(float(probs.global_[k, j]))
                    row[f"local_{lab}"] = probability(float(probs.local[k, j]))
            if calibration is not None:
                row["calibration"] = calibration
            box = geometry.to_original(probs.boxes[k].tolist(), height=rec["height"], width=rec["width"])
            row.update(zip(BOX_COLUMNS, box))
            if thresholds is not None:
                for j, lab in enumerate(labels):
                    t = float(thresholds[j])
                    row[f"call_{lab}"] = None if math.isnan(t) else int(float(p[j]) >= t)
            k += 1
        rows.append(row)
    return rows


def columns_for(labels: Sequence[str], *, identifiers: bool, all_branches: bool, calls: bool,
                calibration: bool = False) -> list[str]:
    cols = ["path", "status", "reason", "format", "height", "width", *UID_COLUMNS]
    if identifiers:
        cols += list(IDENTIFIER_COLUMNS)
    cols += list(labels)
    if all_branches:
        cols += [f"global_{c}" for c in labels] + [f"local_{c}" for c in labels]
    cols += list(BOX_COLUMNS)
    if calls:
        cols += [f"call_{c}" for c in labels]
    if calibration:
        cols.append("calibration")  # the id of the checkpoint's calibration (agcnn calibrate)
    cols.append("notes")
    return cols


def probability(v: float) -> float | None:
    """The shortest decimal that round-trips the float32 value; None for NaN / inf."""
    import numpy as np

    return float(str(np.float32(v))) if math.isfinite(v) else None

