"""``agcnn calibrate``: probabilities that mean what they say on a labelled set, without retraining.

``agcnn calibrate --checkpoint CKPT (--split val | --data TABLE) --out NEW.pt`` scores the
labelled set with the checkpoint (through :func:`agcnn.evaluate.evaluate_checkpoint`, so the
same data rules, split checks and precision apply, and the uncalibrated evaluation of the set is
written beside the new checkpoint), fits one strictly increasing map per branch and finding
(:mod:`agcnn.calibration`; Platt scaling by default, ``--method temperature`` or ``isotonic``),
re-derives the operating points on the calibrated probabilities (Youden's J by default, or the
highest threshold reaching ``--sensitivity S``, or the lowest keeping ``--specificity S``; with
patient-bootstrap intervals), and writes ``NEW.pt``: the same weights with

* ``calibration`` -- the maps, their id (a digest of maps and data), the method, and the data
  they were fitted on, recorded as training records its split (image and patient counts and
  digests, salted patient hashes): ``agcnn evaluate`` refuses a set holding any of them;
* ``operating_points`` (calibrated scale) and ``operating_points_info`` (rule, target, intervals);
* ``reference`` -- the score summary ``agcnn evaluate``'s site check compares a site with: the
  base checkpoint's (the training site's validation split) when it has one, else this set's.

Into ``--report DIR`` (default: ``NEW.calibration/`` beside NEW.pt): the uncalibrated
evaluation of the fitting set (``auc.md``, ``reliability.png``, ...), and ``calibration.md`` /
``calibration.json`` with ECE before and after (on the fitting set: optimistic; evaluate NEW.pt
on held-out data for the numbers to report), the maps and the operating points.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from agcnn import __version__
from agcnn.calibration import (
    DEFAULT_METHOD,
    METHODS,
    Calibration,
    CalibrationError,
    calibration_id,
    ece_summary,
    fit_calibration,
    operating_points,
)
from agcnn.checkpoint import load_checkpoint, save_checkpoint
from agcnn.config import Config
from agcnn.drift import score_reference
from agcnn.evaluate import evaluate_checkpoint
from agcnn.fileio import atomic_write_bytes, sha256_file, utc_now
from agcnn.metrics import per_class_auc
from agcnn.report import fmt

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def fitting_record(table, *, patient_ids: bool, name: str, source: str) -> dict[str, Any]:
    """What a calibration records about its data, as training records its split
    (:func:`agcnn.data.provenance.set_record`): counts, set digests and, with the site key, keyed
    hashes of the patients and image file names; never a clear ID or path. (``patient_ids``: the
    table's IDs are its own, not made up; the record tells that from the table itself.)"""
    from agcnn.data.provenance import set_record

    return {"name": name, "source": source, "fitted": utc_now(), **set_record(table)}


def calibrate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    data: str | Path | None = None,
    method: str = DEFAULT_METHOD,
    sensitivity: float | None = None,
    specificity: float | None = None,
    report_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    bootstrap: int | None = None,
    seed: int = 0,
    data_overrides: list[str] | None = None,
    external_site: bool = False,
) -> dict[str, Any]:
    """Fit the calibration on ``split`` (``val`` or ``test`` of the checkpoint's data) or on the
    table ``data``; write the calibrated checkpoint to ``out``. ``external_site``: ``data`` holds
    another site's films (``agcnn evaluate --external-site``). Returns ``calibration.json``'s content."""
    checkpoint, out = Path(checkpoint), Path(out)
    rule, target = check_arguments(checkpoint, out, split=split, data=data, method=method, sensitivity=sensitivity,
                                   specificity=specificity, external_site=external_site)
    report_dir = Path(report_dir) if report_dir is not None else out.with_suffix(".calibration")
    ckpt = load_checkpoint(checkpoint)
    names = list(ckpt["labels"])
    # The fitting set scored as evaluate scores it: the split checks refuse training patients, and
    # the set's uncalibrated report (ECE, reliability diagram) is written on the way.
    base = evaluate_checkpoint(checkpoint, split=split or str(data), out_dir=report_dir, device=device, batch_size=batch_size,
                               num_workers=num_workers, bootstrap=bootstrap, seed=seed, data_overrides=data_overrides,
                               calibrated=False, keep_scores=True, external_site=external_site)
    scores = base.pop("scores")
    where = "the validation split" if split == "val" else "the test split" if split == "test" else f"the table {Path(data).name}"
    record = fit_calibration(scores["raw"], scores["labels"], names, method)
    record["data"] = fitting_record(scores["table"], patient_ids=base["split"]["patient_ids"], name=where,
                                    source=base["split"]["source"])
    record["id"] = calibration_id(record)
    record.update(agcnn_version=__version__, base_checkpoint_sha256=base["checkpoint_sha256"])
    summary = _summary(record, scores, names, rule=rule, target=target, n_boot=base["bootstrap"]["n"], seed=seed)
    summary.update(checkpoint=str(checkpoint), out=str(out))
    extra = _checkpoint_extra(ckpt, record, summary, base, scores, names, where=where, refresh_reference=split == "val")
    save_checkpoint(out, model_state=ckpt["model"], config=Config.from_dict(ckpt["config"]), **extra)
    summary["out_sha256"] = sha256_file(out)
    report_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1, default=_jsonable, allow_nan=False) + "\n"
    atomic_write_bytes(report_dir / "calibration.json", lambda f: f.write(text.encode()))
    (report_dir / "calibration.md").write_text(calibration_markdown(summary, names))
    if split == "test":
        log.warning("calibrated on the test split: evaluate refuses it for %s from now on; report held-out numbers from "
                    "other data", out.name)
    return summary


def check_arguments(checkpoint: Path, out: Path, *, split: str | None, data: str | Path | None, method: str,
                    sensitivity: float | None, specificity: float | None,
                    external_site: bool = False) -> tuple[str, float | None]:
    """Refuse options that cannot work, naming the fix; return the operating-point rule and its target."""
    if (split is None) == (data is None):
        raise CalibrationError("give the labelled data to calibrate on: --split val (the training run's validation split) "
                               "or --data TABLE.csv (your site's labelled sample), not both")
    if split is not None and split not in SPLITS:
        hint = " (training patients: the model has fitted them)" if split == "train" else ""
        raise CalibrationError(f"--split {split!r} cannot be calibrated on{hint}; use --split val, or --data TABLE.csv")
    if data is not None and not (Path(data).is_file() and Path(data).suffix.lower() == ".csv"):
        raise CalibrationError(f"--data {str(data)!r} is not an existing .csv table of image paths and labels")
    if external_site and data is None:
        raise CalibrationError("--external-site is for --data TABLE.csv (another site's films), not for the checkpoint's own "
                               "split; drop it")
    if method not in METHODS:
        raise CalibrationError(f"--method {method!r} is not known; use one of {list(METHODS)}")
    if sensitivity is not None and specificity is not None:
        raise CalibrationError("give --sensitivity or --specificity, not both: one target fixes the threshold")
    rule, target = ("sensitivity", sensitivity) if sensitivity is not None else (
        ("specificity", specificity) if specificity is not None else ("youden", None))
    if target is not None and not 0.0 < target < 1.0:
        raise CalibrationError(f"--{rule} {target!r} must lie strictly between 0 and 1, e.g. 0.9")
    if out.resolve() == checkpoint.resolve():
        raise CalibrationError(f"--out {str(out)!r} is the checkpoint itself; write the calibrated checkpoint to a new file "
                               f"(the uncalibrated one stays for comparison)")
    if out.suffix != ".pt":
        raise CalibrationError(f"--out {str(out)!r}: name the new checkpoint with .pt")
    return rule, target


def _summary(record: dict[str, Any], scores: dict[str, Any], names: list[str], *, rule: str, target: float | None,
             n_boot: int, seed: int) -> dict[str, Any]:
    """ECE before and after, AUC change, maps and operating points on the fitting set (``calibration.json``)."""
    raw, labels, groups = scores["raw"], scores["labels"], scores["groups"]
    calibration = Calibration(record, names)
    probs = {b: calibration.apply(p, b) for b, p in raw.items()}
    ops = {b: operating_points(probs[b], labels, names, rule=rule, target=target, n_boot=n_boot, seed=seed, groups=groups)
           for b in probs}
    auc_change = max(float(np.nanmax(np.abs(per_class_auc(probs[b], labels) - per_class_auc(raw[b], labels)), initial=0.0))
                     for b in probs)
    return {
        "calibration": calibration.describe(), "method": record["method"],
        "fitting_data": {k: record["data"][k] for k in ("name", "source", "images", "patients")},
        "ece_before": {b: ece_summary(raw[b], labels, names, n_boot=n_boot, seed=seed, groups=groups) for b in raw},
        "ece_after": {b: ece_summary(probs[b], labels, names, n_boot=n_boot, seed=seed, groups=groups) for b in raw},
        "max_auc_change": auc_change,
        "maps": record["branches"],
        "operating_points": {"rule": rule, "target": target, "branches": ops},
    }


def _checkpoint_extra(ckpt: dict[str, Any], record: dict[str, Any], summary: dict[str, Any], base: dict[str, Any],
                      scores: dict[str, Any], names: list[str], *, where: str, refresh_reference: bool) -> dict[str, Any]:
    """Everything the calibrated checkpoint carries besides its weights and config."""
    record["ece_before"] = {b: {k: v[k]["mean"] for k in ("width", "mass")} for b, v in summary["ece_before"].items()}
    record["ece_after"] = {b: {k: v[k]["mean"] for k in ("width", "mass")} for b, v in summary["ece_after"].items()}
    ops = summary["operating_points"]
    own = {"format", "format_version", "agcnn_version", "config", "labels", "model"}
    extra = {k: v for k, v in ckpt.items() if k not in own}
    extra["calibration"] = record
    extra["operating_points"] = {b: [float("nan") if r["threshold"] is None else r["threshold"] for r in v.values()]
                                 for b, v in ops["branches"].items()}
    keys = ("threshold_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")
    extra["operating_points_info"] = {
        "rule": ops["rule"], "target": ops["target"], "split": where, "n_images": int(len(scores["labels"])),
        "calibration": record["id"], "evaluated_with": __version__, "inference_precision": base["inference_precision"],
        "intervals": {b: {n: {k: r[k] for k in keys} for n, r in v.items()} for b, v in ops["branches"].items()},
    }
    # The site check's reference stays the training site's validation split when the checkpoint has it.
    if refresh_reference or not ckpt.get("reference"):
        extra["reference"] = {"name": where, "source": base["split"]["source"], "images": int(len(scores["labels"])),
                              "branches": {b: score_reference(p, scores["labels"], names) for b, p in scores["raw"].items()}}
    return extra


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def calibration_markdown(summary: dict[str, Any], names: list[str]) -> str:
    """``calibration.md``: ECE before / after per branch and finding, and the operating points."""
    cal, fit = summary["calibration"], summary["fitting_data"]
    lines = [f"# Calibration {cal['id']} ({summary['method']})", "",
             f"Fitted on {fit['name']} ({fit['images']} images"
             + (f", {fit['patients']} patients" if fit.get("patients") else "") + f"; {fit['source']}) for "
             f"`{summary['checkpoint']}`; written to `{summary['out']}`. Every map is strictly increasing: the largest "
             f"AUC change on this set is {summary['max_auc_change']:.2g}.", "",
             "ECE on the fitting data (optimistic after calibration: evaluate the new checkpoint on held-out data), "
             "equal-width bins:", "", "| Finding | " + " | ".join(f"{b} before | {b} after" for b in summary["ece_before"]) + " |",
             "|---|" + "---:|---:|" * len(summary["ece_before"])]
    for name in [*names, None]:
        cells = []
        for b in summary["ece_before"]:
            for when in ("ece_before", "ece_after"):
                r = summary[when][b]["width"]
                cells.append(fmt(r["mean"] if name is None else r["ece"][name]))
        lines.append(f"| {'**Mean**' if name is None else name} | " + " | ".join(cells) + " |")
    ops = summary["operating_points"]
    rule = ops["rule"] if ops["target"] is None else f"{ops['rule']} >= {ops['target']}"
    for b, v in ops["branches"].items():
        lines += ["", f"## Operating points, {b} branch ({rule}; calibrated probabilities, 95 % bootstrap intervals)", "",
                  "| Finding | Threshold | Sensitivity | Specificity |", "|---|---:|---:|---:|"]
        for name in names:
            r = v[name]
            if r["threshold"] is None:
                lines.append(f"| {name} | n/a | n/a | n/a |")
                continue
            ci = lambda key: f" [{fmt(r[key][0])}, {fmt(r[key][1])}]" if r[key][0] is not None else ""  # noqa: E731
            lines.append(f"| {name} | {r['threshold']:.3f}{ci('threshold_ci')} | {r['sensitivity']:.3f}{ci('sensitivity_ci')} | "
                         f"{r['specificity']:.3f}{ci('specificity_ci')} |")
    untouched = sorted({f"{n} ({m['reason']})" for b, maps in summary["maps"].items() for n, m in maps.items() if m["kind"] == "identity"})
    if untouched:
        lines += ["", "Left uncalibrated: " + "; ".join(untouched) + "."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pt) to calibrate (its weights are not changed)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--split", choices=SPLITS, help="a split of the checkpoint's own data: val (the training run's "
                                                      "validation split); test makes the test split unusable for evaluation")
    where.add_argument("--data", metavar="TABLE", help="a CSV of image paths and labels (your site's labelled sample); "
                                                      "relative paths are read from the CSV's folder")
    parser.add_argument("--external-site", action="store_true",
                        help="the --data table holds another site's films, so no training patient: calibrated on although "
                             "the overlap cannot be checked (no site key, no patient IDs); the reports say so")
    parser.add_argument("--out", required=True, help="the calibrated checkpoint to write (NEW.pt)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="platt (default: slope and intercept on the logit, fixes over-confidence and a prevalence "
                             "shift), temperature (slope only), isotonic (any monotone shape; needs more data)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sensitivity", type=float, metavar="S", help="operating points: the highest threshold with sensitivity >= S")
    target.add_argument("--specificity", type=float, metavar="S", help="operating points: the lowest threshold with specificity >= S")
    parser.add_argument("--report", default=None, metavar="DIR", help="folder for the fitting set's reports (default: NEW.calibration/)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader processes (default: the checkpoint's)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="bootstrap resamples for the intervals (default: train.bootstrap of the checkpoint); 0 = none")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's data settings, e.g. --set data.root=/mnt/nih (repeatable)")


def run(args: argparse.Namespace) -> int:
    summary = calibrate_checkpoint(
        args.checkpoint, args.out, split=args.split, data=args.data, method=args.method, sensitivity=args.sensitivity,
        specificity=args.specificity, report_dir=args.report, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, bootstrap=args.bootstrap, seed=args.seed, data_overrides=args.overrides,
        external_site=args.external_site,
    )
    before, after = summary["ece_before"], summary["ece_after"]
    ece = ", ".join(f"{b} {fmt(before[b]['width']['mean'])} -> {fmt(after[b]['width']['mean'])}" for b in before)
    fit = summary["fitting_data"]
    print(f"{summary['method']} calibration {summary['calibration']['id']} fitted on {fit['name']} ({fit['images']} images); "
          f"mean ECE on it {ece}; wrote {args.out}")
    maps = summary["maps"].get("fusion") or next(iter(summary["maps"].values()))
    kept = [n for n, m in maps.items() if m["kind"] == "identity"]
    if kept:
        print(f"note: {len(kept)} of {len(maps)} findings keep their raw probabilities (fewer than 5 positives or "
              f"negatives in the data); see {Path(args.report or Path(args.out).with_suffix('.calibration'))}/calibration.md")
    if math.isfinite(summary["max_auc_change"]) and summary["max_auc_change"] > 0:
        print(f"note: the AUCs on the fitting data moved by up to {summary['max_auc_change']:.2g} (ties of the isotonic map)")
    return 0
