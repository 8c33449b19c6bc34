"""``agcnn evaluate``: per-class AUC of the global, local and fusion branches, with intervals.

The model is rebuilt from the checkpoint alone and all three branches are scored in one pass.
Written into ``--out``:

* ``auc.csv`` -- one row per label plus ``Mean``; for each branch the AUC and the bootstrap
  interval (``global_auc, global_lo, global_hi, local_auc, ...``), then positives / negatives /
  missing per label. A branch the checkpoint has not trained has empty cells.
* ``auc.json`` -- the same numbers (``null`` for "no value") with what they were computed on:
  split, image and patient counts, positives per class, the checkpoint's path and sha256, the label
  list, the agcnn version, the bootstrap settings and the patient overlap with the training split.
* ``auc.md`` -- the paper's Table I layout (findings x Global / Local / Fusion, mean row, interval
  in brackets) and footnotes that say which split the numbers come from.
* ``roc.png`` -- a 4 x 4 grid, one panel per finding with the three branches overlaid: a reader
  compares branches on one finding at a time, and 14 curves on one axis cannot be told apart.
* ``reliability.png`` -- the same grid of reliability diagrams (equal-width bins, per branch);
  ``auc.json`` holds each branch's expected calibration error per finding (``branches.<branch>.ece``,
  equal-width and equal-mass bins, bootstrap intervals) and ``auc.md`` its table
  (:mod:`agcnn.calibration`).
* ``predictions.csv`` -- per image: ``path`` (and ``patient`` with ``--include-identifiers``), the reference labels (1 / 0 / empty, the
  checkpoint's label order) and ``p_<branch>_<label>`` probabilities.
* ``skipped.csv`` -- only when some images could not be read: their path and the reason. They are
  left out of every number, and the count is in ``auc.json`` and ``auc.md``.
* ``report.html`` -- all of it on one offline page with the model card (:mod:`agcnn.pages`;
  ``--no-html`` leaves it out).

``--split FILE`` evaluates every row of a CSV table (the columns ``data.path_column``,
``data.patient_column`` and ``data.label_map`` of the checkpoint describe it, as in training) with
the checkpoint's evaluation transform; relative image paths are read from the CSV's folder.

On the validation split the per-class Youden operating points are computed as well and, with
``--write-operating-points``, stored in the checkpoint for ``agcnn predict``. They are never
taken from the test split. On any split, operating points already in the checkpoint are scored
(sensitivity and specificity per class, in ``auc.json``).

The AG-CNN paper's mean AUC of 0.868 (Table I) was measured on a random image-level split of
ChestX-ray14, on which one patient's images fall on both sides; on the official patient-wise split
comparable methods score about 0.80-0.83. The report says which kind of split it used.

A checkpoint written by ``agcnn calibrate`` carries a calibration: every probability is
calibrated (``--uncalibrated``: the raw ones), the reports name it, and a set that shares
patients with the data it was fitted on is refused like training patients. A checkpoint with a
reference score summary (stored with ``--write-operating-points`` and by ``agcnn calibrate``)
gets a site check (:mod:`agcnn.drift`): per finding, the shift of this set's scores from the
reference's (PSI, KS) and the shares called positive at the operating points here and there.

What the numbers are checked against: the checkpoint's split record (agcnn.data.provenance), which
covers every branch, also one trained in an earlier run it was seeded from. A split that differs
from the one the weights were trained and validated on, or an evaluated set that holds (or may
hold) any branch's training patients, is refused before anything is written, unless
``--allow-other-split`` (then every report says so). The model runs at the checkpoint's
``train.inference_precision``, as training validation did, so ``--split val`` reproduces the
validation AUC and operating points that training recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from agcnn import __version__
from agcnn.calibration_report import add_calibration, calibration_markdown, calibration_to_apply, write_reliability_figure
from agcnn.checkpoint import load_checkpoint, save_checkpoint
from agcnn.config import Config, apply_override, describe_start
from agcnn.data.provenance import has_patient_ids
from agcnn.drift import score_reference
from agcnn.errors import ConfigError, UsageError
from agcnn.fileio import atomic_write_bytes
from agcnn.inference import load_for_inference, score
from agcnn.labels import LabelMismatchError
from agcnn.report import auc_markdown, build_report, fmt, write_auc_csv, write_predictions, write_roc_figure
from agcnn.runtime import loader_workers

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")
BOOTSTRAP_UNITS = ("patient", "image")
# Data settings that fix the input the weights were trained on; changing them evaluates a different model.
FIXED_DATA_KEYS = ("image_size", "highres_size", "resize")


class EvaluationError(UsageError, ValueError):
    """The evaluation cannot run as asked (bad split, bad option); the message says what to change."""


# ---------------------------------------------------------------------- inputs

def config_with_data_overrides(raw_config: dict[str, Any], overrides: Sequence[str] | None) -> tuple[Config, list[str]]:
    """The checkpoint's config with ``data.*`` overrides applied; returns it and the keys set.

    ``root=DIR`` and ``data.root=DIR`` are the same override. Only the data section can change:
    the model section must describe the stored weights.
    """
    raw = copy.deepcopy(raw_config)
    keys = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form key=value (e.g. data.root=/data/nih)")
        key = item.split("=", 1)[0].strip()
        if not key.startswith("data."):
            if "." in key:
                raise ConfigError(
                    f"--set {item!r}: evaluate only overrides the data section (data.root, data.test_list, ...); "
                    f"the model and training settings are fixed by the checkpoint"
                )
            key, item = f"data.{key}", f"data.{item.strip()}"
        name = key.split(".", 1)[1]
        if name in FIXED_DATA_KEYS:
            raise ConfigError(
                f"--set {item!r}: data.{name} is fixed by the checkpoint (the weights were trained at "
                f"{raw.get('data', {}).get(name)!r}); evaluating at another size measures a different model"
            )
        apply_override(raw, item)
        keys.append(name)
    return Config.from_dict(raw), keys


class _Records(Dataset):
    """Each item a record, never an exception: the image and labels, or why the file cannot be read.

    One corrupt file must not cost the other 25,000 images of a test set; the unreadable files
    never reach the model, are listed in the report and left out of every number. (The same
    ``{"unreadable": message, "index": i}`` record a ``data.skip_unreadable`` dataset hands back.)
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        from agcnn.data.datasets import ImageLoadError

        try:
            return self.dataset[i]
        except ImageLoadError as e:
            return {"unreadable": str(e), "index": int(i)}


def _collate_records(records: list[dict]) -> tuple[dict | None, list[tuple[int, str]]]:
    """The readable records as one batch (None if there are none), and ``(row, message)`` of the others."""
    from agcnn.data.datasets import collate

    unreadable = [(int(r["index"]), r["unreadable"]) for r in records if "unreadable" in r]
    readable = [r for r in records if "unreadable" not in r]
    return (collate(readable) if readable else None), unreadable


def _named_split(cfg: Config, split: str):
    """The dataset of a named split and a plain-words description of how the split was made."""
    from agcnn.data.datasets import build_datasets, load_dataframe

    table = load_dataframe(cfg)
    dataset = build_datasets(cfg, splits=(split,), table=table)[split]
    # Patient overlap is measured on the data, not inferred from file names: it is what decides
    # whether the numbers can be compared with patient-wise results.
    own = set(table.loc[table["split"] == split, "patient"].astype(str))
    train = set(table.loc[table["split"] == "train", "patient"].astype(str)) if split != "train" else set()
    overlap = len(own & train)
    has_ids = has_patient_ids(table)  # False: normalise_table named each image its own patient
    if cfg.data.dataset == "synthetic":
        kind = "generated phantoms (agcnn.data.synthetic); not comparable with any ChestX-ray14 result"
    elif cfg.data.dataset == "chestxray14":
        lists = cfg.data.test_list or "test_list.txt"
        kind = f"ChestX-ray14, split lists {cfg.data.train_list or 'train_val_list.txt'} / {lists}"
    else:
        kind = f"the table {cfg.data.metadata or Path(cfg.data.root) / 'labels.csv'}"
    info = {
        "source": kind,
        "patient_ids": has_ids,
        "patients": len(own) if has_ids else None,
        "patients_also_in_train": overlap if split != "train" and has_ids else None,
        "patient_wise": (overlap == 0) if split != "train" and has_ids else None,
    }
    return dataset, info, table


def _check_training_split(ckpt: dict[str, Any], cfg: Config, whole: pd.DataFrame | None, dataset, info: dict[str, Any],
                          allow: bool, external: bool = False) -> dict[str, Any]:
    """Compare the evaluated set with every run whose data trained the checkpoint's branches (its
    ``split`` record, agcnn.data.provenance); refuse a changed split or training patients in it
    unless ``allow`` (``--allow-other-split``); ``external``: ``--external-site``. Runs before
    anything is written."""
    from agcnn.data.provenance import ProvenanceError, check_evaluated_set

    try:
        check = check_evaluated_set(ckpt, dataset.table, name=info["name"], whole=whole, data_cfg=cfg.data, allow=allow,
                                    external=external)
    except ProvenanceError as e:
        raise EvaluationError(str(e)) from e
    if check["recorded"] and info["patient_ids"] and info["name"] != "train":
        # Overlap with the patients the weights were trained on, not with a rebuilt train split.
        n = check["patients_also_in_train"]
        info["patients_also_in_train"], info["patient_wise"] = n, None if n is None else n == 0
    info["caveats"] = check["statements"]
    return check


def _file_split(cfg: Config, path: Path, set_keys: list[str]):
    """A CSV of image paths and labels, every row evaluated with the checkpoint's eval transform."""
    from agcnn.data.datasets import XrayDataset, scope_policy
    from agcnn.data.tables import normalise_table, read_table
    from agcnn.data.transforms import transforms_from_config

    d = cfg.data
    # Relative paths in your own file are relative to the file, unless data.root says otherwise.
    root = d.root if "root" in set_keys else str(path.parent)
    # Every row is evaluated: no split is carved out (both fractions 0), and the training run's
    # view filter applies only when asked for with --set data.views=[...].
    with warnings.catch_warnings():
        # Its advice is about splitting for training; here the missing IDs are reported in auc.md.
        warnings.filterwarnings("ignore", message=".*has no patient column.*")
        # No split is made here: a file without patient IDs is evaluated image by image, and says so.
        table = normalise_table(
            read_table(path), cfg.labels, path_column=d.path_column, patient_column=d.patient_column,
            label_map=d.label_map, val_fraction=0.0, test_fraction=0.0, image_wise=True,
            views=d.views if "views" in set_keys else (), where=str(path),
        )
    has_ids = has_patient_ids(table)  # False: normalise_table named each image its own patient
    dataset = XrayDataset(table, cfg.labels, root=root, transform=transforms_from_config(d, train=False), name=path.name,
                          scope=scope_policy(d))
    info = {
        "source": f"the table {path}",
        "patient_ids": has_ids,
        "patients": int(table["patient"].nunique()) if has_ids else None,
        "patients_also_in_train": None,
        "patient_wise": None,
    }
    return dataset, info, None


# ---------------------------------------------------------------------- inference

@torch.inference_mode()
def predict_split(model, dataset, branches: Sequence[str], *, device: torch.device, batch_size: int, num_workers: int,
                  precision: str = "fp32", channels_last: bool = False):
    """Sigmoid probabilities ``{branch: [N, K]}``, labels ``[N, K]`` and table rows of the N images
    that could be read, and ``(row, message)`` for each that could not (it never reaches the model).

    ``precision`` and ``channels_last``: as the training run validated (the checkpoint's
    ``train.inference_precision`` and ``train.channels_last``), so validation numbers reproduce;
    the pass itself is :func:`agcnn.inference.score`.
    """
    model.eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # A global-stage checkpoint needs no region step or local branch.
    stage = "global" if tuple(branches) == ("global",) else "fusion"
    loader = DataLoader(_Records(dataset), batch_size=batch_size, shuffle=False, num_workers=loader_workers(num_workers),
                        collate_fn=_collate_records, pin_memory=device.type == "cuda", persistent_workers=False)
    probs: dict[str, list[np.ndarray]] = {b: [] for b in branches}
    labels, rows, unreadable = [], [], []
    started, n_done = time.monotonic(), 0
    for step, (batch, failed) in enumerate(loader):
        unreadable += failed
        n_done += len(failed)
        if batch is not None:
            scored = score(model, batch["image"], precision=precision, memory_format=memory_format, stage=stage)
            for b in branches:
                # Sigmoid only here, when reporting: the model returns logits.
                probs[b].append(scored.probabilities(b).cpu().numpy())
            labels.append(batch["labels"].numpy())
            rows.append(batch["index"].numpy())
            n_done += len(batch["index"])
        if step % 20 == 0:
            log.info("evaluated %d / %d images (%.0f s)", n_done, len(dataset), time.monotonic() - started)
    if not rows:
        return {b: np.zeros((0, 0)) for b in branches}, np.zeros((0, 0)), np.zeros(0, dtype=int), unreadable
    return ({b: np.concatenate(v).astype(np.float64) for b, v in probs.items()},
            np.concatenate(labels).astype(np.float64), np.concatenate(rows), unreadable)


# ---------------------------------------------------------------------- operating points

def store_operating_points(checkpoint: str | Path, points: dict[str, list[float]], info: dict[str, Any],
                           reference: dict[str, Any] | None = None) -> None:
    """Rewrite the checkpoint (atomically) with ``operating_points`` (and the ``reference`` score
    summary the site check compares with) added; everything else is kept."""
    ckpt = load_checkpoint(checkpoint)
    own = {"format", "format_version", "agcnn_version", "config", "labels", "model"}
    extra = {k: v for k, v in ckpt.items() if k not in own}
    extra["operating_points"] = {b: [float(t) for t in v] for b, v in points.items()}
    extra["operating_points_info"] = info
    if reference is not None:
        extra["reference"] = reference
    save_checkpoint(checkpoint, model_state=ckpt["model"], config=Config.from_dict(ckpt["config"]), **extra)


# ---------------------------------------------------------------------- the library function

@dataclass
class EvaluateOptions:
    """One ``agcnn evaluate`` run (see :func:`evaluate`).

    ``bootstrap``: resamples for the intervals (None: ``train.bootstrap`` of the checkpoint's
    config; 0: no intervals). ``bootstrap_unit``: resample whole ``patient`` s (images of one
    patient are correlated; the default) or single ``image`` s. ``data_overrides``: ``data.key=value``
    items applied to the checkpoint's data section (e.g. ``data.root=/mnt/nih``).
    ``allow_other_split``: evaluate even when the split differs from the one the checkpoint was
    trained with, or holds its training patients (refused otherwise, before anything is written).
    ``external_site``: the CSV holds another site's films, so no training patient; evaluated although
    the overlap cannot be checked (no site key, no patient IDs), and every report says so.
    ``html``: also write ``report.html`` (:mod:`agcnn.pages`).
    ``calibrated``: apply the checkpoint's calibration (``agcnn calibrate``) to the probabilities;
    a set that holds the calibration's fitting data is refused as training patients are.
    ``keep_scores``: add ``scores`` (raw probabilities, labels, table, bootstrap groups) to the
    returned report (not to auc.json), for commands built on this one (``agcnn calibrate``).
    """

    checkpoint: str | Path
    split: str = "test"
    out: str | Path = "evaluation"
    device: str = "auto"
    batch_size: int = 32
    num_workers: int | None = None
    bootstrap: int | None = None
    seed: int = 0
    data_overrides: Sequence[str] | None = field(default=None)
    bootstrap_unit: str = "patient"
    alpha: float = 0.05
    write_operating_points: bool = False
    roc: bool = True
    include_identifiers: bool = False
    allow_other_split: bool = False
    external_site: bool = False
    calibrated: bool = True
    keep_scores: bool = False
    html: bool = True

    def check(self) -> str:
        """Raise :class:`EvaluationError` for an option that cannot work; return the split's name."""
        if self.bootstrap_unit not in BOOTSTRAP_UNITS:
            raise EvaluationError(f"bootstrap unit {self.bootstrap_unit!r} is not known; use one of {list(BOOTSTRAP_UNITS)}")
        if self.batch_size < 1:
            raise EvaluationError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise EvaluationError(f"--num-workers must be 0 (load in this process) or more, got {self.num_workers}")
        if self.bootstrap is not None and self.bootstrap < 0:
            raise EvaluationError(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {self.bootstrap}")
        split_path = Path(self.split)
        if self.split in SPLITS:
            name = self.split
        elif split_path.suffix.lower() == ".csv" and split_path.is_file():
            name = split_path.name
        else:
            hint = " (that file does not exist)" if split_path.suffix else ""
            raise EvaluationError(f"split {self.split!r} is not one of {list(SPLITS)} nor an existing .csv file{hint}; "
                                  f"use --split test, --split val or --split path/to/table.csv")
        if self.external_site and name in SPLITS:
            raise EvaluationError(f"--external-site is for a table of another site's films (--split site.csv), not the "
                                  f"checkpoint's own {name!r} split (checked against its record); drop --external-site")
        if self.write_operating_points and name != "val":
            raise EvaluationError(
                f"--write-operating-points needs --split val (got {self.split!r}): operating points are chosen on the "
                f"validation split, never on the data the model is finally scored on"
            )
        return name


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "test",
    out_dir: str | Path = "evaluation",
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    bootstrap: int | None = None,
    seed: int = 0,
    data_overrides: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``evaluate(EvaluateOptions(...))`` with the same arguments; returns the report."""
    return evaluate(EvaluateOptions(checkpoint, split, out_dir, device, batch_size, num_workers, bootstrap, seed,
                                    data_overrides, **options))


def evaluate(options: EvaluateOptions) -> dict[str, Any]:
    """Evaluate a checkpoint on a split (``test``, ``val``, ``train``) or a CSV file; write the
    report files into ``options.out`` and return the report (``auc.json``)."""
    t0 = time.monotonic()
    o, checkpoint = options, Path(options.checkpoint)
    split_name = o.check()
    loaded = load_for_inference(checkpoint, o.device)
    cfg, set_keys = config_with_data_overrides(loaded.meta["config"], o.data_overrides)
    n_boot = cfg.train.bootstrap if o.bootstrap is None else int(o.bootstrap)
    if n_boot < 0:
        raise EvaluationError(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {n_boot}")
    dataset, split_info = _evaluated_set(loaded.meta, cfg, o, split_name, set_keys)
    calibration = calibration_to_apply(loaded.calibration, calibrated=o.calibrated, write_points=o.write_operating_points,
                                       allow=o.allow_other_split, evaluated=dataset, info=split_info)
    log.info("evaluating %s (%s stage) on %d %s images on %s", checkpoint.name, loaded.stage or "fusion",
             len(dataset), split_name, loaded.device)
    raw, labels, rows, unreadable = predict_split(
        loaded.model, dataset, loaded.branches, device=loaded.device, batch_size=o.batch_size,
        num_workers=cfg.data.num_workers if o.num_workers is None else o.num_workers,
        precision=loaded.precision, channels_last=cfg.train.channels_last,
    )
    probs = {b: calibration.apply(p, b) for b, p in raw.items()} if calibration is not None else raw
    unreadable.sort()
    if not len(rows):
        raise EvaluationError(f"none of the {len(dataset)} images of the {split_name} split could be read; "
                              f"first error: {unreadable[0][1]}")
    if unreadable:
        log.warning("%d of %d images could not be read and are left out (listed in skipped.csv)", len(unreadable), len(dataset))
    table = dataset.table.iloc[rows].reset_index(drop=True)
    if split_info["patient_ids"]:
        split_info["patients"] = int(table["patient"].nunique())  # of the images actually scored
    header = {
        "agcnn_version": __version__, "checkpoint": str(checkpoint), "checkpoint_sha256": loaded.sha256,
        "stage": loaded.stage, "split": split_info, "n_skipped": len(unreadable), "data": cfg.to_dict()["data"],
        "device": str(loaded.device), "inference_precision": loaded.precision, "start": _start(loaded.meta),
        # Which pixels the model was given: the prepare cache's squares, or the decoded originals.
        "pixels": dataset.pixels(),
        "calibration": calibration.describe() if calibration is not None else None,
    }
    if loaded.meta.get("operating_points"):
        # ... and which ones the checkpoint's operating points were chosen on (None: not recorded).
        header["operating_points_pixels"] = (loaded.meta.get("operating_points_info") or {}).get("pixels")
    groups = _bootstrap_groups(table, split_info, o.bootstrap_unit)
    report, aucs, youden = build_report(
        probs, labels, list(loaded.labels), header=header, bootstrap={"n": n_boot, "seed": o.seed, "alpha": o.alpha},
        groups=groups, stored_points=loaded.meta.get("operating_points"),
    )
    add_calibration(report, raw, probs, labels, groups, calibration=loaded.calibration, calibrated=o.calibrated,
                    reference=loaded.meta.get("reference"), points=loaded.meta.get("operating_points"))
    skipped = pd.DataFrame({"path": dataset.table["path"].iloc[[r for r, _ in unreadable]].to_numpy(),
                            "reason": [m for _, m in unreadable]})
    _write_files(Path(o.out), report, table, labels, probs, skipped, aucs, youden, o)
    if o.write_operating_points:
        _write_points(checkpoint, report, youden, raw, labels)
    report["seconds"] = round(time.monotonic() - t0, 2)
    _write_json_and_page(Path(o.out), report, html=o.html)
    if o.keep_scores:
        report["scores"] = {"raw": raw, "labels": labels, "table": table, "groups": groups}
    return report


def _write_json_and_page(out: Path, report: dict[str, Any], *, html: bool) -> None:
    """``auc.json``, then (``html``) the page built from it, ``report.html`` (:mod:`agcnn.pages`)."""
    text = json.dumps(report, indent=1, default=str, allow_nan=False) + "\n"
    atomic_write_bytes(out / "auc.json", lambda f: f.write(text.encode()))
    if html:
        from agcnn.pages import write_report_or_warn

        write_report_or_warn(out)


def _write_points(checkpoint: Path, report: dict[str, Any], youden, raw: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Store the validation Youden points, and the reference score summary the site check compares with."""
    info = {"rule": "youden", "split": "val", "n_images": int(len(labels)), "evaluated_with": __version__,
            "inference_precision": report["inference_precision"], "pixels": report["pixels"],
            "other_split_problems": report["split"]["training_split"]["problems"]}
    reference = {"name": "the validation split", "source": report["split"]["source"], "images": int(len(labels)),
                 "branches": {b: score_reference(p, labels, report["labels"]) for b, p in raw.items()}}
    store_operating_points(checkpoint, youden, info, reference=reference)
    report["operating_points_written"] = True
    log.info("stored the validation Youden operating points in %s", checkpoint)


def _evaluated_set(meta: dict[str, Any], cfg: Config, o: EvaluateOptions, split_name: str, set_keys: list[str]):
    """The dataset of the split and what it is (``split`` of the report), checked against the
    checkpoint's training split; problem files are listed before the model runs."""
    from agcnn.data.precheck import find_problems, listing

    try:
        named = o.split in SPLITS
        dataset, split_info, whole = _named_split(cfg, o.split) if named else _file_split(cfg, Path(o.split), set_keys)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, (ConfigError, LabelMismatchError)):
            raise
        raise EvaluationError(
            f"cannot build the {split_name} data from the checkpoint's data settings (dataset={cfg.data.dataset!r}, "
            f"root={cfg.data.root!r}): {e}. Point evaluate at your copy with --set data.root=DIR (and data.metadata, "
            f"data.test_list, ... as needed)"
        ) from e
    if len(dataset) == 0:
        raise EvaluationError(f"the {split_name} split has no images; check the split lists or the table")
    split_info["name"] = split_name
    split_info["training_split"] = _check_training_split(meta, cfg, whole, dataset, split_info, o.allow_other_split,
                                                         o.external_site)
    dataset.rebuilt_table = whole  # the calibration's fitting set is checked against it too
    # Files that are missing or not images, listed before the model runs; like every file that
    # fails to decode they are left out of the numbers and listed in skipped.csv.
    problems = find_problems(dataset)
    if problems:
        log.warning("%d of %d images cannot be used and will be left out (listed in skipped.csv):%s", len(problems),
                    len(dataset), listing(problems))
    return dataset, split_info


def _start(meta: dict[str, Any]) -> str:
    """Where the checkpoint's branches started (ImageNet or random weights); a checkpoint written
    before training recorded it says so only through its config."""
    return meta.get("start") or describe_start(Config.from_dict(meta["config"]).model)


def _bootstrap_groups(table: pd.DataFrame, split_info: dict[str, Any], unit: str) -> np.ndarray | None:
    """The patient of each image, to resample whole patients; None to resample images."""
    if unit != "patient" or not split_info["patient_ids"]:
        return None
    groups = table["patient"].astype(str).to_numpy()
    # One image per patient: the same thing as resampling images.
    return None if len(np.unique(groups)) == len(groups) else groups


def _write_files(out: Path, report: dict[str, Any], table: pd.DataFrame, labels: np.ndarray, probs: dict[str, np.ndarray],
                 skipped: pd.DataFrame, aucs: dict[str, np.ndarray], youden, o: EvaluateOptions) -> None:
    """auc.csv, predictions.csv, skipped.csv (only when some images were left out), roc.png, auc.md."""
    names = report["labels"]
    out.mkdir(parents=True, exist_ok=True)
    write_auc_csv(out / "auc.csv", report, names)
    write_predictions(out / "predictions.csv", table, labels, probs, names, include_identifiers=o.include_identifiers)
    if len(skipped):
        skipped.to_csv(out / "skipped.csv", index=False)
    else:
        (out / "skipped.csv").unlink(missing_ok=True)
    split = report["split"]
    if o.roc:
        write_roc_figure(out / "roc.png", probs, labels, names, aucs,
                         title=f"ROC, {split['name']} split ({len(labels)} images), {Path(o.checkpoint).name}"
                         + (" [--allow-other-split: not the training run's split]" if split["training_split"]["problems"] else "")
                         + "".join(f" [{c}]" for c in split.get("caveats", [])),
                         points=youden)
    if o.roc:
        cal = report.get("calibration")
        write_reliability_figure(out / "reliability.png", probs, labels, names,
                                 {b: [report["branches"][b]["ece"]["width"]["ece"][n] for n in names] for b in probs},
                                 title=f"Reliability, {split['name']} split ({len(labels)} images), {Path(o.checkpoint).name}, "
                                 + (f"{cal['method']} calibration {cal['id']}" if cal else "raw probabilities"))
    md = auc_markdown(report, names) + calibration_markdown(report, names)
    atomic_write_bytes(out / "auc.md", lambda f: f.write(md.encode()))


# ---------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by `agcnn train`")
    parser.add_argument("--split", default="test",
                        help="test (default), val, train, or a CSV of image paths and labels evaluated as a whole "
                             "(its relative paths are read from the CSV's folder unless --set data.root=DIR is given)")
    parser.add_argument("--out", required=True, help="folder for auc.csv, auc.json, auc.md, roc.png, predictions.csv")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader processes (default: the checkpoint's data.num_workers)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="bootstrap resamples for the intervals (default: train.bootstrap of the checkpoint, 1000); 0 = none")
    parser.add_argument("--bootstrap-unit", choices=BOOTSTRAP_UNITS, default="patient",
                        help="resample whole patients (default; their images are correlated) or single images")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's data settings, e.g. --set data.root=/mnt/nih (repeatable)")
    parser.add_argument("--include-identifiers", action="store_true",
                        help="add the table's patient column to predictions.csv (left out by default)")
    parser.add_argument("--no-roc", dest="roc", action="store_false", help="skip roc.png (drawing it takes a few seconds)")
    parser.add_argument("--no-html", dest="html", action="store_false",
                        help="skip report.html (the page `agcnn report` writes: tables, pictures, model card)")
    parser.add_argument("--allow-other-split", action="store_true",
                        help="evaluate even when the split differs from the checkpoint's training split or holds its "
                             "training patients (refused otherwise); every report then says so")
    parser.add_argument("--external-site", action="store_true",
                        help="the --split table holds another site's films, so no training patient: evaluated although "
                             "the overlap cannot be checked (no site key, no patient IDs); every report says so")
    parser.add_argument("--uncalibrated", dest="calibrated", action="store_false",
                        help="score the model's raw probabilities, without the checkpoint's calibration (agcnn calibrate)")
    parser.add_argument("--write-operating-points", action="store_true",
                        help="with --split val: store the per-class Youden thresholds in the checkpoint for `agcnn predict`")


def run(args: argparse.Namespace) -> int:
    report = evaluate(EvaluateOptions(
        args.checkpoint, split=args.split, out=args.out, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, bootstrap=args.bootstrap, seed=args.seed, data_overrides=args.overrides,
        bootstrap_unit=args.bootstrap_unit, write_operating_points=args.write_operating_points, roc=args.roc,
        include_identifiers=args.include_identifiers, allow_other_split=args.allow_other_split, calibrated=args.calibrated,
        html=args.html, external_site=args.external_site,
    ))
    means = ", ".join(
        f"{b} {fmt(r['mean_auc'])}" for b, r in report["branches"].items() if r["trained"]
    )
    caveats = "".join(f" [{c}]" for c in report["split"].get("caveats", []))
    print(f"mean AUC on {report['split']['name']} ({report['n_images']} images){caveats}: {means}; report in {args.out}/auc.md"
          + (f" and {args.out}/report.html" if (Path(args.out) / "report.html").is_file() and args.html else ""))
    problems = report["split"]["training_split"]["problems"]
    if problems:
        print(f"agcnn evaluate: --allow-other-split: {'; and '.join(problems)}; not a held-out evaluation", file=sys.stderr)
    return 0
