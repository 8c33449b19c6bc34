"""Your own labelled export: one CSV row per image, and patient-wise splitting.

The table needs an image path column (``data.path_column``; absolute, or relative to
``data.root``) and label columns named as the label list or mapped onto it with
``data.label_map`` (table column -> label name). Optional columns:

* ``data.patient_column`` (default ``patient``): splits are made patient-wise. Without it the
  split is made image by image and a warning says that one patient's images may then sit on
  both sides of the split.
* ``split`` with values ``train`` / ``val`` / ``test``: used as given. Missing ``val`` rows are
  carved patient-wise from ``train``; a table without a split column gets both a test and a
  validation share carved from it (``data.test_fraction``, ``data.val_fraction``).

Label cells: ``1`` positive, ``0`` negative; empty, NaN and ``-1`` (uncertain, as in CheXpert)
become NaN, which the loss and the metrics mask out. They are never turned into 0: a missing
label is not a negative finding. A label that is not in the table at all becomes a NaN column,
with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from agcnn.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_patientwise(df: pd.DataFrame, val_fraction: float, seed: int, patient_col: str | None = "patient") -> pd.Series:
    """Assign ``"val"`` to a random ``val_fraction`` of the patients and ``"train"`` to the rest.

    Returns a Series aligned with ``df.index``. Every image of a patient gets the same value, so
    no patient is on both sides. The draw depends only on the sorted set of patient IDs and the
    seed, not on row order. With ``patient_col`` None (or absent) each image is its own patient.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if patient_col is not None and patient_col in df.columns:
        patients = df[patient_col].astype(str)
    else:
        patients = pd.Series([f"#{i}" for i in range(len(df))], index=df.index)
    unique = np.array(sorted(set(patients)))
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) > 1:
        n_val = min(max(n_val, 1), len(unique) - 1)
    chosen = set(unique[rng.permutation(len(unique))[:n_val]])
    return patients.map(lambda p: "val" if p in chosen else "train")


def parse_label_column(values: pd.Series, *, column: str) -> pd.Series:
    """One label column to float: 1 -> 1, 0 -> 0, empty / NaN / -1 -> NaN; anything else is an error."""
    text = values.astype("string").str.strip().str.lower()
    text = text.replace({"": pd.NA, "nan": pd.NA, "true": "1", "false": "0", "uncertain": pd.NA})
    numbers = pd.to_numeric(text, errors="coerce")
    unparsed = text.notna() & numbers.isna()
    if unparsed.any():
        bad = values[unparsed].iloc[0]
        raise DataError(f"label column {column!r} holds {bad!r}; use 1 (positive), 0 (negative), or empty / -1 (missing or uncertain)")
    numbers = numbers.astype(np.float64)
    numbers[numbers == -1] = np.nan
    odd = numbers.notna() & ~numbers.isin([0.0, 1.0])
    if odd.any():
        raise DataError(f"label column {column!r} holds {values[odd].iloc[0]!r}; use 1, 0, or empty / -1 for missing")
    return numbers.astype(np.float32)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"label table {str(path)!r} does not exist; set data.metadata to your CSV export")
    # Everything as text: labels are parsed strictly below, and IDs keep their leading zeros.
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def normalise_table(
    table: pd.DataFrame,
    labels: Sequence[str],
    *,
    path_column: str = "path",
    patient_column: str | None = "patient",
    label_map: dict[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    views: Sequence[str] = (),
    where: str = "table",
) -> pd.DataFrame:
    """Bring a labelled table into the common form ``path, patient, split`` + one float column per label."""
    label_map = dict(label_map or {})
    if path_column not in table.columns:
        raise DataError(f"{where} has no image path column {path_column!r}; set data.path_column to one of {list(table.columns)}")
    bad_targets = [v for v in label_map.values() if v not in labels]
    if bad_targets:
        raise DataError(f"data.label_map maps onto {bad_targets}, which are not in the label list {list(labels)}")
    missing_src = [k for k in label_map if k not in table.columns]
    if missing_src:
        raise DataError(f"data.label_map names columns {missing_src} that {where} does not have; its columns are {list(table.columns)}")

    out = pd.DataFrame({"path": table[path_column].astype(str).str.strip()})
    if (out["path"] == "").any():
        raise DataError(f"{where} row {int(np.flatnonzero(out['path'] == '')[0]) + 2} has an empty {path_column!r}")

    source = {name: name for name in labels if name in table.columns}
    source.update({label: column for column, label in label_map.items()})
    absent = [name for name in labels if name not in source]
    if absent:
        warnings.warn(
            f"{where} has no column for labels {absent}; they are treated as missing (NaN) for every image. "
            f"Map your column names with data.label_map if they are spelled differently.",
            stacklevel=2,
        )
    for name in labels:
        out[name] = parse_label_column(table[source[name]], column=source[name]) if name in source else np.float32(np.nan)

    if patient_column and patient_column in table.columns:
        out["patient"] = table[patient_column].astype(str).str.strip()
        has_patient = True
    else:
        warnings.warn(
            f"{where} has no patient column {patient_column!r}; splitting image by image, so images of one "
            f"patient may land in both training and test and inflate the scores. Set data.patient_column "
            f"to the patient-ID column (columns: {list(table.columns)}).",
            stacklevel=2,
        )
        out["patient"] = [f"image-{i}" for i in range(len(out))]
        has_patient = False

    if views:
        column = next((c for c in ("view", "View Position", "ViewPosition") if c in table.columns), None)
        if column is None:
            raise DataError(f"data.views={list(views)} needs a view column (view / View Position) in {where}")
        keep = table[column].astype(str).str.strip().str.upper().isin({v.upper() for v in views}).to_numpy()
        out, table = out[keep].reset_index(drop=True), table[keep].reset_index(drop=True)

    out["split"] = _splits(out, table, where, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    if has_patient:
        by = out.groupby("patient")["split"].nunique()
        if (by > 1).any():
            raise DataError(
                f"patient {by[by > 1].index[0]!r} has images in more than one split of {where} ({int((by > 1).sum())} such patients); "
                f"fix the split column so each patient is in exactly one split"
            )
    return out[["path", "patient", "split", *labels]]


def _splits(out: pd.DataFrame, table: pd.DataFrame, where: str, *, val_fraction: float, test_fraction: float,
            split_seed: int) -> pd.Series:
    """Each row's split: the table's split column (val carved from train when it has none), or
    patient-wise test and val shares."""
    out = out.copy()
    if "split" in table.columns:
        split = table["split"].astype(str).str.strip().str.lower().replace({"valid": "val", "validation": "val"})
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise DataError(f"the split column of {where} holds {bad}; use train, val or test")
        out["split"] = split.to_numpy()
        if not (out["split"] == "val").any() and val_fraction > 0:
            log.info("%s has no val rows; carving %.0f%% of the training patients as validation", where, 100 * val_fraction)
            train = out["split"] == "train"
            out.loc[train, "split"] = split_patientwise(out.loc[train], val_fraction, split_seed, "patient")
    else:
        held = split_patientwise(out, test_fraction, split_seed, "patient")
        out["split"] = held.map({"val": "test", "train": "train"})
        train = out["split"] == "train"
        rest = val_fraction / (1.0 - test_fraction) if test_fraction < 1 else 0.0
        out.loc[train, "split"] = split_patientwise(out.loc[train], min(rest, 0.99), split_seed + 1, "patient")
    return out["split"]


def load_table(
    path: str | Path,
    labels: Sequence[str],
    **kwargs,
) -> pd.DataFrame:
    """Read a CSV export and normalise it (see :func:`normalise_table` for the keyword arguments)."""
    return normalise_table(read_table(path), labels, where=str(path), **kwargs)
