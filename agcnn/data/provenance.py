"""Which patients a checkpoint was trained and validated on, recorded so evaluation cannot leak.

Training stores a *split record* in every checkpoint: the data settings that decide the split,
and for the training and validation splits the number of images and patients and a sha256 of
the sorted patient IDs and of the sorted image paths. It also stores the training patients as
salted, truncated hashes, so any later table can be checked for overlap without the checkpoint
carrying a hospital's patient IDs in the clear.

``agcnn evaluate`` rebuilds the splits from the checkpoint's data settings plus any ``--set``
overrides. :func:`split_problems` compares what it built with the record: a changed
``data.split_seed`` (or ``val_fraction``, ``views``, split lists, ...) that moves patients between
splits, or an evaluated set that holds training patients, is a problem that stops the evaluation
unless ``--allow-other-split`` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterable
from typing import Any

import pandas as pd

# The data settings that decide which image falls into which split (data.root is left out: the
# same files moved to another folder make the same split, which the digests confirm).
SPLIT_KEYS = ("dataset", "metadata", "train_list", "val_list", "test_list", "path_column", "patient_column",
              "label_map", "views", "val_fraction", "test_fraction", "split_seed",
              "synthetic_count", "synthetic_size", "synthetic_seed")
RECORD_VERSION = 1


def _digest(values: Iterable[str]) -> str:
    h = hashlib.sha256()
    for v in sorted(set(values)):
        h.update(v.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def hashed_patients(patients: Iterable[str], salt: str) -> set[str]:
    """Salted sha256 of each patient ID, first 16 hex digits (64 bits: no collisions in practice)."""
    return {hashlib.sha256(f"{salt}\0{p}".encode("utf-8", "surrogatepass")).hexdigest()[:16] for p in patients}


def split_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Images, patients and the digests of one split's table (``path`` and ``patient`` columns)."""
    patients = table["patient"].astype(str)
    # File names, not paths: the same images under another data.root are the same split.
    names = table["path"].astype(str).map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])
    return {"images": int(len(table)), "patients": int(patients.nunique()),
            "patients_sha256": _digest(patients), "images_sha256": _digest(names)}


def split_record(data_cfg, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """The record a checkpoint carries for the ``train`` and ``val`` tables it was trained with."""
    data = dataclasses.asdict(data_cfg)
    salt = secrets.token_hex(8)
    return {
        "version": RECORD_VERSION,
        "settings": {k: data.get(k) for k in SPLIT_KEYS},
        "train": split_summary(tables["train"]),
        "val": split_summary(tables["val"]),
        "salt": salt,
        "train_patients": sorted(hashed_patients(tables["train"]["patient"].astype(str), salt)),
    }


def changed_settings(record: dict[str, Any], data_cfg) -> list[str]:
    """``data.key: <training value> in training, <value> here`` for every split setting that differs."""
    now = dataclasses.asdict(data_cfg)
    was = record.get("settings", {})
    return [f"data.{k}: {was.get(k)!r} in training, {now.get(k)!r} here" for k in SPLIT_KEYS if was.get(k) != now.get(k)]


def split_problems(record: dict[str, Any], data_cfg, table: pd.DataFrame | None, evaluated: pd.DataFrame,
                   name: str, *, patient_ids: bool = True) -> list[str]:
    """Why evaluating ``evaluated`` (the ``name`` split) would not be what the checkpoint implies.

    ``table`` is the whole rebuilt table (every split; None for a table given by file, which has no
    train / val part to compare). ``patient_ids`` False: the table had no patient column, so an
    overlap cannot be looked for.
    """
    problems = []
    if table is not None:
        moved = [s for s in ("train", "val") if split_summary(table[table["split"] == s]) != record[s]]
        if moved:
            changed = changed_settings(record, data_cfg)
            why = "; ".join(changed) if changed else (
                "no split setting differs, so the files behind data.root / data.metadata / the split lists do")
            problems.append(f"the {' and '.join(moved)} split built here differs from the one the checkpoint was "
                            f"trained with ({why})")
    if patient_ids and name != "train":
        mine = hashed_patients(evaluated["patient"].astype(str), record["salt"])
        overlap = len(mine & set(record["train_patients"]))
        if overlap:
            problems.append(f"{overlap} of the {len(mine)} patients of the {name} set have images the checkpoint was "
                            f"trained on")
    return problems
