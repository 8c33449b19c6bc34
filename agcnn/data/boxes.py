"""Box tables of ground-truth findings (``agcnn localize``): NIH's ``BBox_List_2017.csv`` and the
phantoms' ``boxes.csv``, read into one layout with the pixel space each box is given in."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from agcnn.errors import DataError, UsageError

log = logging.getLogger(__name__)

# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.
LABEL_ALIASES = {"Infiltrate": "Infiltration"}
NIH_BOX_SPACE = 1024


class LocalizationError(DataError):
    """A box table or image folder that ``agcnn localize`` cannot use; the message names it and the fix."""


def read_box_table(path: str | os.PathLike[str], labels: Sequence[str], box_space: str | None = None) -> pd.DataFrame:
    """Read a box table into ``path, label, x0, y0, x1, y1, space_w, space_h`` (floats, x1/y1 exclusive).

    Two layouts are recognised by their header: NIH's ``Image Index, Finding Label, Bbox [x,y,w,h]``
    (boxes as x, y, width, height in a 1024 x 1024 space) and the phantoms' ``path, label, x0, y0,
    x1, y1`` (pixels of the image itself). ``box_space``: ``image`` (the image's own pixel size),
    ``N`` or ``WxH`` overrides the layout's default. ``space_w`` / ``space_h`` are 0 for ``image``.
    Rows whose finding is not in ``labels`` are dropped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise LocalizationError(f"box table {str(path)!r} does not exist; pass BBox_List_2017.csv(.gz) or a boxes.csv")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same to the user
        raise LocalizationError(f"box table {str(path)!r} cannot be read as CSV: {e}") from e
    if raw.empty:
        raise LocalizationError(f"box table {str(path)!r} is empty")
    header = [h.strip() for h in raw.iloc[0].tolist()]
    body = raw.iloc[1:]
    if header[:2] == ["Image Index", "Finding Label"]:
        if raw.shape[1] < 6:
            raise LocalizationError(f"box table {str(path)!r} has the NIH header but fewer than 6 columns (x, y, w, h)")
        cols = body.iloc[:, :6]
        table = pd.DataFrame({"path": cols.iloc[:, 0].str.strip(), "label": cols.iloc[:, 1].str.strip()})
        xywh = cols.iloc[:, 2:6].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        table["x0"], table["y0"] = xywh[:, 0], xywh[:, 1]
        table["x1"], table["y1"] = xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]
        default_space = str(NIH_BOX_SPACE)
    elif {"path", "label", "x0", "y0", "x1", "y1"} <= set(header):
        cols = body.set_axis(header, axis=1)
        table = pd.DataFrame({"path": cols["path"].str.strip(), "label": cols["label"].str.strip()})
        for c in ("x0", "y0", "x1", "y1"):
            table[c] = pd.to_numeric(cols[c], errors="coerce").to_numpy(float)
        default_space = "image"
    else:
        raise LocalizationError(
            f"box table {str(path)!r} has neither the NIH header (Image Index, Finding Label, Bbox [x,y,w,h]) nor the "
            f"columns path, label, x0, y0, x1, y1; its header is {header[:6]}"
        )
    bad = table[["x0", "y0", "x1", "y1"]].isna().any(axis=1) | (table["x1"] <= table["x0"]) | (table["y1"] <= table["y0"])
    if bad.any():
        first = table[bad].iloc[0]
        raise LocalizationError(
            f"box table {str(path)!r}: {int(bad.sum())} rows have a missing or empty box (first: {first['path']}, "
            f"{first['label']}); every box needs numbers with x1 > x0 and y1 > y0"
        )
    table["label"] = table["label"].replace(LABEL_ALIASES)
    unknown = sorted(set(table["label"]) - set(labels))
    if unknown:
        log.warning("box table: %d boxes of findings the model does not predict are left out: %s",
                    int(table["label"].isin(unknown).sum()), ", ".join(unknown))
        table = table[~table["label"].isin(unknown)]
    table["space_w"], table["space_h"] = _parse_space(box_space or default_space)
    return table.reset_index(drop=True)


def _parse_space(text: str) -> tuple[float, float]:
    text = str(text).strip().lower()
    if text == "image":
        return 0.0, 0.0
    try:
        parts = [float(p) for p in text.split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UsageError(f"--box-space {text!r} is not valid; use image, a side such as 1024, or WxH such as 2500x2048")
    return parts[0], parts[1]
