"""NIH ChestX-ray14 metadata: the Data_Entry table, the official split lists, CheXNet-style lists.

Three file formats meet here:

* ``Data_Entry_2017.csv`` and ``Data_Entry_2017_v2020.csv(.gz)``: one row per image. Their header
  has commas inside two column names (``OriginalImage[Width,Height]``,
  ``OriginalImagePixelSpacing[x,y]``), so a plain ``pandas.read_csv`` shifts names against
  values; the 2017 file also ends every line with an extra comma. :func:`read_data_entry` parses
  the header itself and reads the rows by position.
* ``train_val_list.txt`` / ``test_list.txt``: the official *patient-wise* split, one image name
  per line (the last line has no newline).
* CheXNet-style lists (``name`` followed by 14 binary labels, space separated), the format the
  earlier AG-CNN PyTorch code trains from. The widely used arnoweng/CheXNet lists (70/10/20)
  are patient-wise too, but differ from the official split; their labels are the 2017 ones.

:func:`load_chestxray14` joins them into the table every dataset in :mod:`agcnn.data` uses:
``path, patient, split, view`` plus one float column per label (NaN = missing).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from agcnn.errors import DataError, MissingFileError
from agcnn.labels import LABELS, NO_FINDING

log = logging.getLogger(__name__)

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv.gz", "Data_Entry_2017.csv")

# Data_Entry header name -> our column name. Only these are kept; the pixel sizes and spacings
# describe the DICOM originals, not the 1024 px PNGs, and are not needed to train.
_COLUMNS = {
    "Image Index": "image",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}

# Split a header on commas that are not inside [...], so "OriginalImage[Width,Height]" stays one name.
_HEADER_SPLIT = re.compile(r",(?![^\[]*\])")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_data_entry(path: str | Path, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """Read a ``Data_Entry_2017*.csv(.gz)`` file into one row per image.

    Columns: ``image, finding_labels, follow_up, patient, age, sex, view`` and one float column
    (0/1) per name in ``labels``, parsed from "Finding Labels" (``A|B``, ``No Finding``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ChestX-ray14 metadata file {str(path)!r} does not exist; set data.metadata to Data_Entry_2017_v2020.csv(.gz)")
    with _open_text(path) as f:
        header = [h.strip() for h in _HEADER_SPLIT.split(f.readline().rstrip("\r\n"))]
        missing = [h for h in _COLUMNS if h not in header]
        if missing:
            raise DataError(f"{str(path)!r} does not look like a ChestX-ray14 Data_Entry file: columns {missing} are missing (header: {header})")
        positions = [header.index(h) for h in _COLUMNS]
        # Rows are read by position: names with commas inside them, and the 2017 file's trailing
        # comma, add fields that must not shift the columns we keep.
        table = pd.read_csv(f, header=None, usecols=positions, dtype=str, keep_default_na=False)
    table = table[positions]
    table.columns = list(_COLUMNS.values())
    table["image"] = table["image"].str.strip()
    table["view"] = table["view"].str.strip().str.upper()
    table["patient"] = table["patient"].str.strip()
    table["follow_up"] = pd.to_numeric(table["follow_up"], errors="coerce")
    table["age"] = pd.to_numeric(table["age"].str.rstrip("YMDymd"), errors="coerce")
    onehot = parse_finding_labels(table["finding_labels"], labels, where=str(path))
    return pd.concat([table.reset_index(drop=True), onehot], axis=1)


def parse_finding_labels(findings: pd.Series, labels: Sequence[str] = LABELS, *, where: str = "Finding Labels") -> pd.DataFrame:
    """Turn ``"A|B"`` / ``"No Finding"`` strings into 0/1 float columns in ``labels`` order.

    A finding that is not one of the 14 NIH names is an error (it would silently become a
    negative); a NIH finding that is not in ``labels`` is simply not a target.
    """
    unknown_targets = [x for x in labels if x not in LABELS]
    if unknown_targets:
        raise DataError(f"labels {unknown_targets} are not ChestX-ray14 findings; valid names: {list(LABELS)}")
    text = findings.fillna("").astype(str).str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    onehot = text.str.get_dummies(sep="|")
    bad = sorted(set(onehot.columns) - set(LABELS) - {NO_FINDING})
    if bad:
        raise DataError(f"{where}: unknown finding names {bad[:5]}; expected '|'-separated names from {list(LABELS)} or {NO_FINDING!r}")
    return onehot.reindex(columns=list(labels), fill_value=0).astype(np.float32).reset_index(drop=True)


def read_name_list(path: str | Path) -> list[str]:
    """Read an official split list (one image name per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"split list {str(path)!r} does not exist; set data.train_list / data.test_list to train_val_list.txt / test_list.txt")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return names


def is_labelled_list(path: str | Path) -> bool:
    """True when a list file has labels after the name (CheXNet style), False for bare names."""
    with open(path) as f:
        for line in f:
            if line.strip():
                return len(line.split()) > 1
    return False


def read_labelled_list(path: str | Path, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """Read a CheXNet-style list: ``name l1 ... l14`` per line, labels in the NIH order.

    Returns ``image`` plus one float column per name in ``labels``.
    """
    path = Path(path)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(LABELS) + 1), None)
    if bad is not None:
        raise DataError(
            f"{str(path)!r} line {bad + 1} has {len(rows[bad]) - 1} labels, expected {len(LABELS)} "
            f"(name followed by 0/1 for {list(LABELS)})"
        )
    values = np.asarray([r[1:] for r in rows], dtype=np.float32)
    table = pd.DataFrame(values, columns=list(LABELS))
    table.insert(0, "image", [r[0] for r in rows])
    return table[["image", *labels]]


def patient_from_name(name: str) -> str:
    """NIH image names are ``<patient>_<follow-up>.png``; the patient is the part before ``_``."""
    head = Path(name).stem.split("_")[0]
    # Data_Entry writes Patient ID without the zero padding of the file name.
    return str(int(head)) if head.isdigit() else head


def find_metadata(root: str | Path) -> Path | None:
    """The Data_Entry file in ``root`` or its parent, newest labels first."""
    for folder in (Path(root), Path(root).parent):
        for name in DATA_ENTRY_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def locate_images(root: str | Path, names: Sequence[str]) -> list[str]:
    """Paths (relative to ``root``) of the NIH images, wherever the archives were unpacked.

    The 12 NIH archives unpack to ``images_001/images/...``; Kaggle and most scripts merge them
    into one ``images/`` folder. Both layouts work; a missing image is an error that names it.
    """
    root = Path(root)
    for sub in ("", "images"):
        if names and (root / sub / names[0]).is_file() and (root / sub / names[-1]).is_file():
            prefix = f"{sub}/" if sub else ""
            return [prefix + n for n in names]
    found: dict[str, str] = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for f in files:
            found.setdefault(f, f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    missing = [n for n in names if n not in found]
    if missing:
        raise MissingFileError(
            f"{len(missing)} of {len(names)} ChestX-ray14 images are not under data.root={str(root)!r} "
            f"(e.g. {missing[:3]}); unpack all 12 NIH archives there, or train on the images you have "
            f"with dataset: csv and a table that lists them"
        )
    return [found[n] for n in names]


def load_chestxray14(
    root: str | Path,
    *,
    metadata: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    labels: Sequence[str] = LABELS,
    views: Sequence[str] = (),
    val_fraction: float = 0.1,
    split_seed: int = 0,
    check_files: bool = True,
) -> pd.DataFrame:
    """The ChestX-ray14 table with a ``split`` column (train / val / test).

    Labels come from the Data_Entry file; when the split lists are CheXNet-style (name + 14
    labels) and no Data_Entry file is found, the lists' own labels are used, as the earlier
    AG-CNN code did. Without ``val_list``, validation is carved patient-wise from the training
    list (``val_fraction``, ``split_seed``); the test list is never used for selection.
    """
    from agcnn.data.tables import split_patientwise

    root = Path(root)

    def default(name: str) -> Path:
        # The NIH download keeps the lists beside images/; data.root may point at either folder.
        return next((f / name for f in (root, root.parent) if (f / name).is_file()), root / name)

    train_list = Path(train_list) if train_list else default("train_val_list.txt")
    test_list = Path(test_list) if test_list else default("test_list.txt")
    metadata = Path(metadata) if metadata else find_metadata(root)

    lists = {"train": train_list, "test": test_list}
    if val_list:
        lists["val"] = Path(val_list)
    table = _with_labels(_read_lists(lists, labels), metadata, root, labels, views)
    if views:
        wanted = {v.upper() for v in views}
        table = table[table["view"].isin(wanted)].reset_index(drop=True)

    leaked = set(table.loc[table["split"] == "train", "patient"]) & set(table.loc[table["split"] != "train", "patient"])
    if leaked:
        # As for a CSV table: a patient on both sides makes every validation and test number
        # optimistic, and the operating points would be chosen on training patients.
        raise DataError(
            f"{len(leaked)} patients have images in both the training list and the validation/test list (e.g. patient "
            f"{sorted(leaked)[0]!r}); the split must be patient-wise. Use the official NIH lists (train_val_list.txt, "
            f"test_list.txt), or move every image of those patients to one side"
        )
    if "val" not in lists and val_fraction > 0:
        train = table["split"] == "train"
        table.loc[train, "split"] = split_patientwise(table.loc[train], val_fraction, split_seed, "patient")

    table["path"] = locate_images(root, list(table["image"])) if check_files else list(table["image"])
    for name in labels:
        table[name] = table[name].astype(np.float32)
    return table[["path", "image", "patient", "split", "view", *labels]].reset_index(drop=True)


def _read_lists(lists: dict[str, Path], labels: Sequence[str]) -> pd.DataFrame:
    """The split lists as one table of ``image, split`` (and the labels of CheXNet-style lists)."""
    parts = []
    for split, path in lists.items():
        if not Path(path).is_file():
            official = {"train": "train_val_list.txt", "test": "test_list.txt", "val": "val_list.txt"}[split]
            raise MissingFileError(f"{split} list {str(path)!r} does not exist; set data.{split}_list to the path of {official}")
        if is_labelled_list(path):
            part = read_labelled_list(path, labels)
        else:
            part = pd.DataFrame({"image": read_name_list(path)})
        part["split"] = split
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    dup = table["image"][table["image"].duplicated()]
    if len(dup):
        raise DataError(f"image {dup.iloc[0]!r} is listed in more than one split list ({len(dup)} such names); the lists must not overlap")
    return table


def _with_labels(table: pd.DataFrame, metadata: Path | None, root: Path, labels: Sequence[str], views: Sequence[str]) -> pd.DataFrame:
    """Patient, view and labels of each listed image, from the Data_Entry file or the lists."""
    has_list_labels = all(c in table.columns for c in labels) and table[list(labels)].notna().all().all()
    if metadata is not None:
        entry = read_data_entry(metadata, labels).set_index("image")
        unknown = table["image"][~table["image"].isin(entry.index)]
        if len(unknown):
            raise DataError(f"{len(unknown)} listed images are not in {str(metadata)!r} (e.g. {unknown.iloc[0]!r}); the lists and the metadata must come from the same release")
        if has_list_labels:
            # Labels from the lists (2017) win, so an old split reproduces earlier results;
            # the Data_Entry file only contributes patient and view.
            table = table.join(entry[["patient", "view"]], on="image")
        else:
            table = table[["image", "split"]].join(entry[["patient", "view", *labels]], on="image")
    elif has_list_labels:
        table["patient"] = table["image"].map(patient_from_name)
        table["view"] = ""
        if views:
            raise DataError("data.views needs the Data_Entry file (View Position); set data.metadata to Data_Entry_2017_v2020.csv.gz")
    else:
        raise MissingFileError(f"no Data_Entry_2017*.csv(.gz) found in {str(root)!r} or its parent; set data.metadata to its path")
    return table
