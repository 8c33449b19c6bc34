"""The calibration parts of an evaluation: which calibration applies (and the refusal of the
data it was fitted on), the ECE and site-check numbers of ``auc.json``, their tables in
``auc.md`` and ``reliability.png``.

:func:`agcnn.evaluate.evaluate` calls these with its scores; the math is in
:mod:`agcnn.calibration` and :mod:`agcnn.drift`. Imports those, :mod:`agcnn.data.provenance`,
:mod:`agcnn.report` and :mod:`agcnn.stages`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agcnn.calibration import ECE_BINS, Calibration, CalibrationError, ece_summary, reliability_bins
from agcnn.drift import site_check
from agcnn.report import BRANCH_COLOURS, finding_grid, fmt
from agcnn.stages import BRANCHES



def calibration_to_apply(calibration: Calibration | None, *, calibrated: bool, write_points: bool, allow: bool,
                         evaluated: Any, info: dict[str, Any], whole: pd.DataFrame | None = None) -> Calibration | None:
    """The checkpoint's calibration to apply (None: none, or --uncalibrated), after refusing a set
    that shares patients (or, without patient IDs, image files) with the data it was fitted on:
    its maps and operating points were chosen on them (or that cannot be ruled out: see
    :func:`agcnn.data.provenance.set_overlap`; ``whole``: the table rebuilt from the checkpoint's
    data settings). ``evaluated``: the evaluated table, or a dataset with ``table`` (and
    ``rebuilt_table``, the ``whole`` it was taken from)."""
    from agcnn.data.provenance import set_overlap

    if calibration is not None and not calibrated and write_points:
        raise CalibrationError("--write-operating-points with --uncalibrated: the checkpoint's operating points apply to its "
                              "calibrated probabilities; drop --uncalibrated, or re-run agcnn calibrate to choose new ones")
    if calibration is None or not calibrated:
        return None
    data = calibration.record.get("data") or {}
    if not data.get("id"):
        return calibration
    whole = getattr(evaluated, "rebuilt_table", whole)
    overlap, unit = set_overlap(data, getattr(evaluated, "table", evaluated), whole=whole)
    if overlap is None:
        # Not refused (its training patients are checked apart), but every report says so.
        info.setdefault("caveats", []).append(
            f"whether the {info['name']} set shares {unit} with the data calibration {calibration.id} was fitted on "
            f"cannot be checked without the site key it was fitted with")
        return calibration
    if overlap:
        problem = (f"{overlap} {unit} of the {info['name']} set are in the data the checkpoint's "
                   f"calibration {calibration.id} was fitted on ({data.get('name')})")
    if overlap != 0:
        if not allow:
            raise CalibrationError(
                f"refusing to evaluate: {problem}. Calibration and operating points were chosen on them, so the numbers "
                f"would not be held out. Evaluate on other data, use --uncalibrated, or pass --allow-other-split (every "
                f"report then says so)")
        info["training_split"]["problems"].append(problem)
    return calibration


def add_calibration(report: dict[str, Any], raw: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                    labels: np.ndarray, groups: np.ndarray | None, *, calibration: Calibration | None, calibrated: bool,
                    reference: Mapping[str, Any] | None, points: Mapping[str, Any] | None) -> None:
    """ECE of every branch (on the resamples of the AUC intervals), and the site check of the
    deployed branch's raw scores against the checkpoint's reference summary."""
    names, bs = report["labels"], report["bootstrap"]
    for b, p in probs.items():
        report["branches"][b]["ece"] = ece_summary(p, labels, names, n_boot=bs["n"], seed=bs["seed"], alpha=bs["alpha"],
                                                   groups=groups)
    if not calibrated and calibration is not None:
        report["calibration_skipped"] = calibration.id
    branch = "fusion" if "fusion" in raw else next(iter(raw))
    if not reference or branch not in reference.get("branches", {}):
        report["site_check_note"] = ("The checkpoint carries no reference score summary, so this set was not compared with "
                                     "the training site's: `agcnn evaluate --split val --write-operating-points` or "
                                     "`agcnn calibrate` stores one.")
        return
    # The operating points are on the calibrated scale: the shares called use the calibration even with --uncalibrated.
    report["site_check"] = site_check(reference, raw[branch], names, thresholds=(points or {}).get(branch),
                                      calibration=calibration, branch=branch, labels=labels)


def _interval(v: float | None, lo: float | None, hi: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f} [{fmt(lo)}, {fmt(hi)}]" if lo is not None else f"{v:.3f}"


def calibration_markdown(report: Mapping[str, Any], names: Sequence[str]) -> str:
    """The ``auc.md`` sections on calibration: which calibration the probabilities carry, ECE per
    finding and branch (both binnings), and the site check when there is one."""
    branches = report["branches"]
    trained = [b for b in BRANCHES if branches[b]["trained"]]
    cal = report.get("calibration")
    lines = ["", "## Calibration", ""]
    if cal:
        d = cal["data"]
        lines.append(f"Probabilities calibrated by the checkpoint's **{cal['method']} calibration `{cal['id']}`**, fitted on "
                     f"{d.get('name')} ({d.get('images')} images{', ' + str(d['patients']) + ' patients' if d.get('patients') else ''}; "
                     f"{d.get('source')}).")
    elif report.get("calibration_skipped"):
        lines.append(f"Raw model probabilities: the checkpoint's calibration `{report['calibration_skipped']}` was not applied (asked for).")
    else:
        lines.append("Raw model probabilities: the checkpoint carries no calibration (`agcnn calibrate` fits one).")
    bins = next((branches[b]["ece"]["bins"] for b in trained if "ece" in branches[b]), ECE_BINS)
    lines += ["", f"Expected calibration error (ECE, {bins} bins; lower is better, 0 = probabilities match the observed "
                  f"frequencies): equal-width bins / equal-mass bins.", "",
              "| Finding | " + " | ".join(f"{b.capitalize()} width | {b.capitalize()} mass" for b in trained) + " |",
              "|---|" + "---:|---:|" * len(trained)]
    for name in [*names, None]:
        cells = []
        for b in trained:
            e = branches[b]["ece"]
            for binning in ("width", "mass"):
                r = e[binning]
                cells.append(_interval(r["mean"], *r["mean_ci"]) if name is None else _interval(r["ece"][name], r["lo"][name], r["hi"][name]))
        label = "**Mean** (findings with both label values)" if name is None else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "ECE is biased upward on small samples (a perfectly calibrated model scores about 0.02-0.04 on 200 "
                  "images); equal-mass bins show miscalibration among the many low probabilities of a rare finding that "
                  "equal-width bins average away. In brackets: the spread over the AUC's bootstrap resamples, which "
                  "are biased upward more (repeated images), so for a well-calibrated model it can lie above the value. "
                  "reliability.png shows the bins (equal width)."]
    site = report.get("site_check")
    if site:
        lines += ["", f"## Site check ({site['branch']} branch) against {site['reference'].get('name')}", "",
                  f"This set's {site['images']} images against the {site['reference'].get('images')} of the reference "
                  f"({site['reference'].get('source')}). PSI: population stability index of the raw scores over the "
                  f"reference's deciles; **moved** at PSI >= {site['psi_moved']}, *watch* at >= {site['psi_watch']}. "
                  f"KS: largest gap between the two score distributions. Called: share at or above the operating point.", "",
                  "| Finding | PSI | KS | Flag | Threshold | Called here | Called in reference | Prevalence here | Prevalence in reference |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for name, r in site["findings"].items():
            flag = {"moved": "**moved**", "watch": "*watch*"}.get(r["flag"], "-")
            lines.append(f"| {name} | {r['psi']:.3f} | {r['ks']:.3f} | {flag} | {fmt(r['threshold'])} | {fmt(r['called_here'])} | "
                         f"{fmt(r['called_reference'])} | {fmt(r['prevalence_here'])} | {fmt(r['prevalence_reference'])} |")
        moved = site["moved"]
        lines += ["", (f"**The scores of {', '.join(moved)} moved**: the model sees this population differently from the "
                       f"reference; check its calibration and operating points on a labelled sample of this site "
                       f"(`agcnn calibrate`) before relying on them." if moved else
                       "No finding's scores moved beyond the PSI threshold.")
                  + " PSI is noisy below about 100 images."]
    elif report.get("site_check_note"):
        lines += ["", "## Site check", "", report["site_check_note"]]
    return "\n".join(lines) + "\n"


def write_reliability_figure(path: Path, probs: Mapping[str, np.ndarray], labels: np.ndarray, names: Sequence[str],
                             eces: Mapping[str, Sequence[float | None]], title: str, n_bins: int = ECE_BINS) -> None:
    """One panel per finding (the grid of roc.png): per branch the mean probability against the
    fraction positive of each equal-width bin, marker area by the bin's share of images."""
    fig, axes, _ = finding_grid(names, labels, xlabel="mean probability", ylabel="fraction positive", ylim=(-0.01, 1.01))
    for k, ax in enumerate(axes):
        y = labels[:, k]
        seen = ~np.isnan(y)
        if not seen.any():
            ax.text(0.5, 0.5, "no labels", ha="center", va="center", fontsize=8)
            continue
        for b, p in probs.items():
            mean_p, frac, counts = reliability_bins(p[:, k], y, n_bins)
            full = counts > 0
            e = eces[b][k]
            ax.plot(mean_p[full], frac[full], "-", color=BRANCH_COLOURS[b], lw=1.0,
                    label=f"{b} {e:.3f}" if e is not None else b)
            ax.scatter(mean_p[full], frac[full], s=4 + 60 * counts[full] / counts.sum(), color=BRANCH_COLOURS[b], zorder=3)
        ax.legend(fontsize=7, loc="upper left", title="ECE", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
