"""The site check: how far a site's scores are from a reference set's, per finding.

:func:`score_reference` summarises a reference set's raw probabilities per
finding (201 quantiles, prevalence); :func:`shift` compares a site's raw probabilities with it:
the population stability index over the reference's deciles (PSI; 0.10-0.25 is a moderate,
above 0.25 a major shift, the thresholds used in credit-risk monitoring) and the two-sample
Kolmogorov-Smirnov distance. Both depend only on the order of the scores, so they are the same
for calibrated and raw probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agcnn.calibration import Calibration, check_scores

__all__ = ["PSI_MOVED", "PSI_WATCH", "called_rate", "score_reference", "shift", "site_check"]

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)
PSI_BINS = 10
PSI_WATCH, PSI_MOVED = 0.10, 0.25


def score_reference(probs: np.ndarray, labels: np.ndarray | None, names: Sequence[str]) -> dict[str, Any]:
    """Per finding the raw probabilities' quantiles at :data:`QUANTILE_LEVELS` and the
    prevalence: what :func:`shift` compares a site with (a few kB, no image-level value)."""
    probs, labels = check_scores(probs, labels)
    out = {"levels": [float(v) for v in QUANTILE_LEVELS], "images": int(len(probs)), "findings": {}}
    for k, name in enumerate(names):
        y = labels[:, k] if labels is not None else np.array([])
        y = y[~np.isnan(y)]
        out["findings"][name] = {"quantiles": [float(v) for v in np.quantile(probs[:, k], QUANTILE_LEVELS)],
                                 "prevalence": float(y.mean()) if y.size else None}
    return out


def _reference_cdf(q: np.ndarray, levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The reference's distribution function at ``x``, read off its quantile table (right-continuous)."""
    idx = np.searchsorted(q, x, side="right")
    return np.where(idx == 0, 0.0, levels[np.maximum(idx - 1, 0)])


def shift(reference: Mapping[str, Any], probs: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per finding: PSI of the site's raw probabilities over the reference's deciles, the KS
    distance to the reference, and a ``flag`` (``moved`` at PSI >= 0.25, ``watch`` at >= 0.10, else ``-``).

    KS is read off the reference's 201 quantiles, so it is exact to about 0.005.
    """
    probs, _ = check_scores(probs)
    levels = np.asarray(reference["levels"], dtype=np.float64)
    out = {}
    for k, name in enumerate(names):
        ref = reference["findings"].get(name)
        if ref is None:
            continue
        q = np.asarray(ref["quantiles"], dtype=np.float64)
        site = np.sort(probs[:, k])
        edges = np.unique(np.interp(np.linspace(0, 1, PSI_BINS + 1)[1:-1], levels, q))
        expected = np.diff(np.r_[0.0, _reference_cdf(q, levels, edges), 1.0])
        actual = np.bincount(np.searchsorted(edges, site, side="left"), minlength=len(edges) + 1) / max(len(site), 1)
        # Empty bins would make the index infinite; 1e-4 is the customary floor.
        e, a = np.maximum(expected, 1e-4), np.maximum(actual, 1e-4)
        psi = float(((a - e) * np.log(a / e)).sum())
        points = np.r_[q, site]
        site_cdf = np.searchsorted(site, points, side="right") / max(len(site), 1)
        ks = float(np.abs(site_cdf - _reference_cdf(q, levels, points)).max())
        flag = "moved" if psi >= PSI_MOVED else "watch" if psi >= PSI_WATCH else "-"
        out[name] = {"psi": psi, "ks": ks, "flag": flag}
    return out


def called_rate(quantiles: np.ndarray, levels: np.ndarray, threshold: float) -> float:
    """Share of a reference called positive at ``threshold`` (``p >= t``), read off its quantiles
    (after any calibration map: a monotone map moves quantiles with the scores)."""
    q = np.asarray(quantiles, dtype=np.float64)
    if threshold > q[-1]:
        return 0.0
    if threshold <= q[0]:
        return 1.0
    # The first quantile at or above the threshold: everything from that level up is called positive.
    i = int(np.searchsorted(q, threshold, side="left"))
    lo = levels[i - 1] + (levels[i] - levels[i - 1]) * (threshold - q[i - 1]) / (q[i] - q[i - 1]) if q[i] > q[i - 1] else levels[i]
    return float(1.0 - lo)


def site_check(reference: Mapping[str, Any], raw: np.ndarray, names: Sequence[str], *,
               thresholds: Sequence[float | None] | None = None, calibration: Calibration | None = None,
               branch: str = "fusion", labels: np.ndarray | None = None) -> dict[str, Any]:
    """A site's raw ``branch`` probabilities against a checkpoint's reference summary, per finding:
    PSI, KS and flag (:func:`shift`), the share called positive at the operating point here and
    in the reference (both on calibrated probabilities when there is a ``calibration``), and the
    observed prevalence here and there."""
    raw, labels = check_scores(raw, labels)
    ref = reference["branches"][branch]
    levels = np.asarray(ref["levels"], dtype=np.float64)
    moved = shift(ref, raw, names)
    probs = calibration.apply(raw, branch) if calibration is not None else raw
    rows = {}
    for k, name in enumerate(names):
        if name not in moved:
            continue
        r = dict(moved[name])
        t = None if thresholds is None or thresholds[k] is None or math.isnan(float(thresholds[k])) else float(thresholds[k])
        q = np.asarray(ref["findings"][name]["quantiles"], dtype=np.float64)
        if calibration is not None:
            q = calibration.apply_one(q, branch, name)
        r["threshold"] = t
        r["called_here"] = float((probs[:, k] >= t).mean()) if t is not None and len(probs) else None
        r["called_reference"] = called_rate(q, levels, t) if t is not None else None
        y = labels[:, k][~np.isnan(labels[:, k])] if labels is not None else np.array([])
        r["prevalence_here"] = float(y.mean()) if y.size else None
        r["prevalence_reference"] = ref["findings"][name]["prevalence"]
        rows[name] = r
    return {"branch": branch, "reference": {k: reference.get(k) for k in ("name", "source", "images")},
            "images": int(len(raw)), "psi_watch": PSI_WATCH, "psi_moved": PSI_MOVED, "findings": rows,
            "moved": [n for n, r in rows.items() if r["flag"] == "moved"],
            "watch": [n for n, r in rows.items() if r["flag"] == "watch"]}
