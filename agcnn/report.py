"""The evaluation report: the numbers (:func:`build_report`), and ``auc.md``, ``auc.csv``,
``predictions.csv`` and ``roc.png`` rendered from them.

:func:`build_report` is a pure function from probabilities, reference labels and what they were
computed on to the report dictionary that ``auc.json`` holds; :mod:`agcnn.evaluate` scores the
images and writes the files, so the numbers can be tested without a model or a folder.

Imports: :mod:`agcnn.metrics` and :mod:`agcnn.stages`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agcnn.metrics import bootstrap_auc_ci, mean_auc, per_class_auc, youden_thresholds
from agcnn.stages import BRANCHES

PAPER_NOTE = (
    "The AG-CNN paper's mean AUC of 0.868 (Guan et al., Table I) was measured on a random image-level "
    "split of ChestX-ray14, which puts images of one patient on both sides of the split. Numbers on such "
    "a split are not comparable to numbers on the official patient-wise split (test_list.txt), on which "
    "comparable methods score about 0.80-0.83. Compare only numbers measured on the same split."
)


def json_number(x: Any) -> float | None:
    """A JSON-safe number: NaN (no value) becomes null."""
    x = float(x)
    return None if math.isnan(x) else x


def fmt(x: float | None) -> str:
    """Three decimals, or ``n/a`` for no value."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def build_report(
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    names: Sequence[str],
    *,
    header: dict[str, Any],
    bootstrap: dict[str, Any],
    groups: np.ndarray | None = None,
    stored_points: dict[str, Sequence[float]] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, list[float]] | None]:
    """The report of scored images: ``(report, aucs, youden)``.

    ``probs``: ``{branch: [N, K]}`` for the trained branches; ``labels`` [N, K] (1 / 0 / NaN).
    ``header``: what the numbers were computed on (checkpoint, split, pixels, ...), copied first.
    ``bootstrap``: ``n``, ``seed``, ``alpha``; resampling whole patients when ``groups`` (one id
    per image) is given. ``stored_points``: the checkpoint's operating points, scored when they
    fit. ``youden``: per-class Youden thresholds of every trained branch, on the validation
    split only (``header["split"]["name"] == "val"``), else None.
    """
    report: dict[str, Any] = {
        **header,
        "labels": list(names),
        "n_images": int(len(labels)),
        "positives": {n: int((labels[:, k] == 1).sum()) for k, n in enumerate(names)},
        "negatives": {n: int((labels[:, k] == 0).sum()) for k, n in enumerate(names)},
        "missing": {n: int(np.isnan(labels[:, k]).sum()) for k, n in enumerate(names)},
        "bootstrap": {**bootstrap, "unit": "patient" if groups is not None else "image"},
        "branches": {},
    }
    aucs: dict[str, np.ndarray] = {}
    for b in BRANCHES:
        if b not in probs:
            report["branches"][b] = {"trained": False}
            continue
        aucs[b] = per_class_auc(probs[b], labels)
        report["branches"][b] = _branch_numbers(probs[b], labels, names, aucs[b], bootstrap, groups)
    youden = None
    if report["split"]["name"] == "val":
        youden = {b: [float(t) for t in youden_thresholds(p, labels)] for b, p in probs.items()}
        report["youden_operating_points"] = {b: {n: json_number(t) for n, t in zip(names, v)} for b, v in youden.items()}
    if isinstance(stored_points, dict):
        use = "fusion" if "fusion" in stored_points and "fusion" in probs else next((b for b in probs if b in stored_points), None)
        if use is not None and len(stored_points[use]) == len(names):
            report["operating_points_scored"] = {
                "branch": use, "classes": operating_point_scores(probs[use], labels, stored_points[use], names)}
    return report, aucs, youden


def _branch_numbers(probs: np.ndarray, labels: np.ndarray, names: Sequence[str], aucs: np.ndarray, bootstrap: dict[str, Any],
                    groups: np.ndarray | None) -> dict[str, Any]:
    r = {"trained": True, "auc": {n: json_number(a) for n, a in zip(names, aucs)},
         "mean_auc": json_number(mean_auc(aucs)), "classes_in_mean": int((~np.isnan(aucs)).sum()),
         "ci_lo": {n: None for n in names}, "ci_hi": {n: None for n in names}, "mean_ci": [None, None]}
    if int(bootstrap["n"]) > 0:
        # The same seed for every branch: paired resamples, so branch differences are not resampling noise.
        lo, hi, mlo, mhi = bootstrap_auc_ci(probs, labels, n_boot=int(bootstrap["n"]), seed=bootstrap["seed"],
                                            alpha=bootstrap["alpha"], groups=groups)
        r["ci_lo"] = {n: json_number(x) for n, x in zip(names, lo)}
        r["ci_hi"] = {n: json_number(x) for n, x in zip(names, hi)}
        r["mean_ci"] = [json_number(mlo), json_number(mhi)]
    return r


def operating_point_scores(probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float], names: Sequence[str]) -> dict:
    """Sensitivity and specificity per class at the given thresholds (None where undefined)."""
    out = {}
    for k, name in enumerate(names):
        t = float(thresholds[k])
        seen = ~np.isnan(labels[:, k])
        y, called = labels[seen, k] == 1, probs[seen, k] >= t
        pos, neg = int(y.sum()), int((~y).sum())
        out[name] = {
            "threshold": json_number(t),
            "sensitivity": json_number((called & y).sum() / pos) if pos and not math.isnan(t) else None,
            "specificity": json_number((~called & ~y).sum() / neg) if neg and not math.isnan(t) else None,
        }
    return out


def pixels_text(pixels: dict[str, Any] | None) -> str:
    """Which pixels the model was given, in words (see ``XrayDataset.pixels``)."""
    if not pixels:
        return "pixels not recorded"
    if pixels.get("source") == "prepare_cache":
        return (f"the `agcnn prepare` cache ({pixels.get('size')} px {pixels.get('dtype')} squares), not the decoded "
                f"originals `agcnn predict` reads")
    if pixels.get("source") == "original_resized":
        return f"the decoded originals resized to {pixels.get('size')} px squares first"
    return "the decoded originals, as `agcnn predict` reads them"


BRANCH_COLOURS = {"global": "tab:blue", "local": "tab:orange", "fusion": "tab:green"}


def finding_grid(names: Sequence[str], labels: np.ndarray, *, xlabel: str, ylabel: str, ylim: tuple[float, float]):
    """The grid of roc.png and reliability.png, four panels a row: ``(figure, one axis per finding,
    the first unused axis or None)``. Each finding's axis has its title (with its positives), the
    diagonal, equal aspect and the outer axis labels; unused axes are switched off."""
    from matplotlib.figure import Figure

    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    # Figure (not pyplot): no global backend state, renders with Agg on a headless server.
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.05, top=0.93, wspace=0.25, hspace=0.35)
    flat = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in flat[len(names):]:
        ax.axis("off")
    for k, ax in enumerate(flat[:len(names)]):
        y = labels[:, k]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_title(f"{names[k]} (n+={int((y[~np.isnan(y)] == 1).sum())})", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(*ylim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if k // cols == rows - 1 or k + cols >= len(names):
            ax.set_xlabel(xlabel, fontsize=8)
    return fig, flat[:len(names)], (flat[len(names)] if len(flat) > len(names) else None)


def write_roc_figure(path: Path, probs: dict[str, np.ndarray], labels: np.ndarray, names: Sequence[str],
                     aucs: dict[str, np.ndarray], title: str, points: dict[str, Sequence[float]] | None = None) -> None:
    """One panel per finding with the trained branches overlaid; Youden points marked when given."""
    from sklearn.metrics import roc_curve

    fig, axes, spare = finding_grid(names, labels, xlabel="1 - specificity", ylabel="sensitivity", ylim=(0, 1.01))
    if spare is not None:
        summary = "\n".join(f"{b}: {mean_auc(a):.3f}" for b, a in aucs.items())
        spare.text(0.05, 0.5, f"mean AUC\n{summary}", va="center", fontsize=10)
    for k, ax in enumerate(axes):
        seen = ~np.isnan(labels[:, k])
        y = labels[seen, k]
        if y.size == 0 or y.min() == y.max():
            ax.text(0.5, 0.5, "one label value only:\nno ROC curve", ha="center", va="center", fontsize=8)
            continue
        for b, p in probs.items():
            fpr, tpr, thr = roc_curve(y, p[seen, k])
            ax.plot(fpr, tpr, color=BRANCH_COLOURS[b], lw=1.2, label=f"{b} {aucs[b][k]:.3f}")
            if points and b in points and not math.isnan(points[b][k]):
                called = p[seen, k] >= points[b][k]
                ax.plot(called[y == 0].mean(), called[y == 1].mean(), "o", color=BRANCH_COLOURS[b], ms=4)
        ax.legend(fontsize=7, loc="lower right", title="AUC", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def auc_markdown(report: dict, names: Sequence[str]) -> str:
    """``auc.md``: the per-class table with intervals, and notes on how to read it."""
    branches = report["branches"]
    split = report["split"]
    has_ci = report["bootstrap"]["n"] > 0

    def cell(b: str, k: int | None) -> str:
        r = branches[b]
        if not r["trained"]:
            return "not trained"
        if k is None:
            v, lo, hi = r["mean_auc"], *r["mean_ci"]
        else:
            v, lo, hi = r["auc"][names[k]], r["ci_lo"][names[k]], r["ci_hi"][names[k]]
        if v is None:
            return "n/a"
        return f"{v:.3f} [{fmt(lo)}, {fmt(hi)}]" if has_ci else f"{v:.3f}"

    n_in_mean = max((r["classes_in_mean"] for r in branches.values() if r["trained"]), default=0)
    lines = [
        f"# AG-CNN per-class AUC: {split['name']} split" + "".join(f" ({c})" for c in split.get("caveats", [])),
        "",
        f"Checkpoint `{report['checkpoint']}` (sha256 `{report['checkpoint_sha256'][:16]}...`, stage "
        f"{report['stage'] or 'fusion'}, trained from {report.get('start') or 'an unrecorded start'}), "
        f"agcnn {report['agcnn_version']}. "
        f"{report['n_images']} images" + (f" of {split['patients']} patients" if split.get("patients") else "")
        + f" from {split['source']}. Scored at {report['inference_precision']} on {report['device']}, the "
        f"precision training validated at, on {pixels_text(report.get('pixels'))}.",
        "",
        "| Finding | Positives | Global | Local | Fusion |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, name in enumerate(names):
        lines.append(f"| {name} | {report['positives'][name]} | " + " | ".join(cell(b, k) for b in BRANCHES) + " |")
    lines.append(f"| **Mean** ({n_in_mean} of {len(names)} findings) | | " + " | ".join(cell(b, None) for b in BRANCHES) + " |")
    lines.append("")
    lines += [f"{i}. {n}" for i, n in enumerate(_notes(report, has_ci), 1)]
    ops = report.get("operating_points_scored")
    if ops:
        lines += ["", f"## At the checkpoint's operating points ({ops['branch']} branch)", "",
                  "| Finding | Threshold | Sensitivity | Specificity |", "|---|---:|---:|---:|"]
        for name in names:
            r = ops["classes"][name]
            lines.append(f"| {name} | {fmt(r['threshold'])} | {fmt(r['sensitivity'])} | {fmt(r['specificity'])} |")
    return "\n".join(lines) + "\n"


def _notes(report: dict, has_ci: bool) -> list[str]:
    """The footnotes of auc.md: which split, intervals, what was left out, how to compare."""
    split, branches = report["split"], report["branches"]
    notes = []
    check = split.get("training_split") or {}
    if check.get("problems"):
        notes.append(f"**Evaluated with --allow-other-split although {'; and '.join(check['problems'])}: these numbers are "
                     f"not a held-out evaluation of this checkpoint.**")
    elif check.get("recorded") and check.get("rebuilt"):
        unit = "patients" if check["train"].get("patients") is not None else "images"
        notes.append(f"The split matches the one the checkpoint was trained on ({check['train'][unit]} training, "
                     f"{check['val'][unit]} validation {unit}).")
    elif check and not check.get("recorded"):
        notes.append("The checkpoint records no training split (written before agcnn recorded it, or trained on data "
                     "passed in directly), so the split was not checked against it.")
    if has_ci:
        bs = report["bootstrap"]
        notes.append(
            f"In brackets: {100 * (1 - bs['alpha']):.0f}% percentile bootstrap interval, {bs['n']} resamples of "
            f"{'whole patients' if bs['unit'] == 'patient' else 'images'} (seed {bs['seed']}); the same resamples for all branches."
        )
    else:
        notes.append("No confidence intervals were computed (--bootstrap 0).")
    notes.append("n/a: the finding has only one label value in this split, so it has no AUC; the mean leaves it out.")
    if any(not r["trained"] for r in branches.values()):
        notes.append(f"not trained: the checkpoint is from the {report['stage']} stage; that branch holds untrained weights and is not scored.")
    if report["n_skipped"]:
        notes.append(f"{report['n_skipped']} images could not be read and are left out (see skipped.csv).")
    if split["patient_wise"] is True:
        notes.append(f"No patient of the {split['name']} split has images in the training split (patient-wise split).")
    elif split["patient_wise"] is False:
        notes.append(
            f"**{split['patients_also_in_train']} of the {split['patients']} patients of the {split['name']} split also "
            f"have images in the training split: this is not a patient-wise split and the scores are optimistic.**"
        )
    elif not split["patient_ids"]:
        notes.append(
            "The table has no patient IDs: images of one patient may be on both sides of the split, which makes "
            "the scores optimistic, and the interval resamples images, which makes it too narrow."
        )
    elif split["name"] != "train":
        notes.append("Patient overlap with the training data was not checked (a table given by file, and a checkpoint "
                     "without a training split record).")
    if split["name"] == "val":
        notes.append("These are validation numbers, used to choose checkpoints and operating points; report the test split.")
    if split["name"] == "train":
        notes.append("These are training-set numbers: they show fit, not how the model generalises.")
    chosen_on = report.get("operating_points_pixels")
    if report.get("operating_points_scored") and chosen_on and chosen_on != report.get("pixels"):
        notes.append(f"The checkpoint's operating points were chosen on {pixels_text(chosen_on)}; here the model saw "
                     f"{pixels_text(report.get('pixels'))}, so calls close to a threshold can differ.")
    notes.append(PAPER_NOTE)
    return notes


def write_auc_csv(path: Path, report: dict, names: Sequence[str]) -> None:
    """``auc.csv``: one row per finding and the mean; AUC and interval per branch."""
    header = ["label"] + [f"{b}_{c}" for b in BRANCHES for c in ("auc", "lo", "hi")] + ["positives", "negatives", "missing"]

    def val(x):
        return "" if x is None else f"{x:.6f}"

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for name in [*names, "Mean"]:
            row = [name]
            for b in BRANCHES:
                r = report["branches"][b]
                if not r["trained"]:
                    row += ["", "", ""]
                elif name == "Mean":
                    row += [val(r["mean_auc"]), val(r["mean_ci"][0]), val(r["mean_ci"][1])]
                else:
                    row += [val(r["auc"][name]), val(r["ci_lo"][name]), val(r["ci_hi"][name])]
            if name == "Mean":
                row += ["", "", ""]
            else:
                row += [report["positives"][name], report["negatives"][name], report["missing"][name]]
            w.writerow(row)


def write_predictions(path: Path, table: pd.DataFrame, labels: np.ndarray, probs: dict[str, np.ndarray], names: Sequence[str],
                      *, include_identifiers: bool = False) -> None:
    """``predictions.csv``: per image its reference labels and each branch's probabilities."""
    out = pd.DataFrame({"path": table["path"].to_numpy()})
    # A hospital table's patient column is often a record number: written only when asked.
    if include_identifiers and "patient" in table.columns:
        out["patient"] = table["patient"].to_numpy()
    for k, name in enumerate(names):
        # Reference labels as in the input tables: 1, 0, empty for missing.
        out[name] = pd.array(np.where(np.isnan(labels[:, k]), np.nan, labels[:, k]), dtype="Int64")
    for b, p in probs.items():
        for k, name in enumerate(names):
            out[f"p_{b}_{name}"] = p[:, k]
    out.to_csv(path, index=False, float_format="%.6f")
