"""Calibration: how far probabilities are from observed frequencies, the monotone maps that fix
them, operating points with intervals, and how far a site's scores are from a reference.

Pure numpy (plus MONAI's calibration binning, scipy's optimiser and scikit-learn's isotonic
regression); the conventions of :mod:`agcnn.metrics` hold: ``probs`` and ``labels`` are
``[N, K]``, a missing label (NaN) is left out for its finding only, an image is called positive
at operating point ``t`` when ``prob >= t``.

**Calibration error.** The expected calibration error (ECE; Guo et al., *On Calibration of
Modern Neural Networks*, ICML 2017) of one finding sorts the images into bins by probability and
averages ``|mean probability - fraction positive|`` over the bins, weighted by their share of
the images. Two binnings are reported: ``width`` -- 15 equal-width bins of [0, 1], exactly
MONAI's :class:`~monai.metrics.CalibrationErrorMetric` (which computes the point value); and
``mass`` -- 15 bins of equally many images (Nixon et al. 2019, "adaptive" ECE), which MONAI does
not offer: equal-width bins leave most images of a rare finding in the first bin, where a
miscalibration among the low probabilities averages away. Both are biased upward on small
samples (a perfectly calibrated model of 200 images scores about 0.02-0.04); compare ECEs of one
data set, and read the interval.

**Maps.** Every map is fitted per finding on a labelled set and is strictly increasing, so
the ranking of the images, and with it every AUC, is unchanged:

* ``platt`` (default) -- ``sigmoid(a * logit(p) + b)`` with ``a > 0`` (Platt 1999). The intercept
  is what a new site needs: when its prevalence differs from the training site's, the model's
  probabilities are off by a constant on the logit scale, which temperature scaling (no
  intercept) cannot move.
* ``temperature`` -- ``sigmoid(logit(p) / T)`` (Guo et al.): one parameter, it fixes over- or
  under-confidence only and keeps 0.5 where it was.
* ``isotonic`` -- scikit-learn's isotonic regression on the logit: any monotone shape, at the
  cost of more data. It is a step function, and steps would tie images the model ranks apart
  (and change the AUC), so 0.1 % of the raw probability is blended in:
  ``0.999 * iso(p) + 0.001 * p`` keeps the order and moves no probability by more than 0.001.

Platt and temperature are fitted to Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and
``1 / (N- + 2)``: a finding the calibration set separates perfectly would otherwise drive the
slope to infinity. A finding with fewer than :data:`MIN_EACH` positives or negatives in the
calibration set keeps its probabilities (an ``identity`` map, with the reason).

The maps act on the probabilities agcnn has always reported (float32 sigmoid outputs), through
``logit(p)`` in float64: images whose probabilities were tied stay tied, the others stay in
order, so an AUC of calibrated probabilities equals the AUC of the raw ones exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agcnn.errors import UsageError
from agcnn.metrics import resample_weights

__all__ = [
    "BINNINGS", "ECE_BINS", "METHODS", "DEFAULT_METHOD", "RULES",
    "Calibration", "CalibrationError",
    "ece", "bootstrap_ece_ci", "reliability_bins", "ece_summary", "mean_over_findings",
    "fit_map", "apply_map", "fit_calibration", "calibration_id", "operating_points",
]

ECE_BINS = 15
BINNINGS = ("width", "mass")
METHODS = ("platt", "temperature", "isotonic")
DEFAULT_METHOD = "platt"
RULES = ("youden", "sensitivity", "specificity")
# A finding needs this many positives and negatives in the calibration set to get a map.
MIN_EACH = 5
# Share of the raw probability blended into the isotonic map, so that it is strictly increasing.
ISOTONIC_BLEND = 1e-3
# Logits are clipped here for fitting only (a probability of exactly 0 or 1 has an infinite logit).
_FIT_CLIP = 50.0


class CalibrationError(UsageError, ValueError):
    """A calibration cannot be fitted or applied as asked; the message says what to change."""


# ---------------------------------------------------------------------- checks

def check_scores(probs: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2:
        raise ValueError(f"probs must be an [N, K] array, got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        bad = probs[~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))][0]
        raise ValueError(f"probabilities must lie in [0, 1], found {float(bad)!r}")
    if labels is None:
        return probs, None
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.shape != probs.shape:
        raise ValueError(f"probs and labels must have the same shape, got {probs.shape} and {labels.shape}")
    observed = labels[~np.isnan(labels)]
    if not np.isin(observed, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 1, 0 or NaN (missing), found {float(observed[~np.isin(observed, (0.0, 1.0))][0]):g}")
    return probs, labels


def _check_bins(n_bins: int, binning: str) -> None:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}; {ECE_BINS} is customary")
    if binning not in BINNINGS:
        raise ValueError(f"binning {binning!r} is not known; use one of {list(BINNINGS)}")


# ---------------------------------------------------------------------- calibration error

def _width_bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each probability, as MONAI's ``calibration_binning``: float32 edges
    ``linspace(0, 1 + eps, n_bins + 1)``, a value on an edge in the bin below it."""
    edges = np.linspace(0.0, 1.0 + np.finfo(np.float32).eps, n_bins + 1, dtype=np.float32)
    return np.minimum(np.searchsorted(edges[1:], p.astype(np.float32), side="left"), n_bins - 1)


def _weighted_ece(p: np.ndarray, y: np.ndarray, weights: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """ECE of one finding under each row of ``weights`` (``[B, n]`` image counts), ``[B]``.

    With bins fixed, ``sum_b (n_b / N) |mean p_b - mean y_b| = sum_b |sum p_b - sum y_b| / N``:
    the per-bin sums are one matrix product per resample block. Equal-mass bins are redrawn in
    every resample from its own weighted ranks; tied probabilities share a bin.
    """
    B, n = weights.shape
    total = weights.sum(axis=1)
    if binning == "width":
        onehot = np.zeros((n, n_bins))
        onehot[np.arange(n), _width_bins(p, n_bins)] = 1.0
        diff = weights @ (onehot * (p - y)[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(diff).sum(axis=1) / total
    order = np.argsort(p, kind="stable")
    ps, ys, w = p[order], y[order], weights[:, order]
    first = np.r_[True, ps[1:] != ps[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    # Weight of the images ranked below each tie group: its bin is floor(n_bins * below / total).
    before = np.cumsum(w, axis=1) - w
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = before[:, starts][:, group] / total[:, None]
    bins = np.clip(np.floor(frac * n_bins), 0, n_bins - 1).astype(np.int64)
    flat = (bins + (np.arange(B) * n_bins)[:, None]).ravel()
    diff = np.bincount(flat, weights=(w * (ps - ys)[None, :]).ravel(), minlength=B * n_bins).reshape(B, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(diff).sum(axis=1) / total


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS, binning: str = "width") -> np.ndarray:
    """Expected calibration error of every finding, ``[K]``; NaN for a finding with no observed label.

    ``width``: MONAI's :class:`~monai.metrics.CalibrationErrorMetric` (equal-width bins,
    expected reduction) on the observed images of each finding. ``mass``: equal-mass bins.
    """
    probs, labels = check_scores(probs, labels)
    _check_bins(n_bins, binning)
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        seen = ~np.isnan(labels[:, k])
        if not seen.any():
            continue
        p, y = probs[seen, k], labels[seen, k]
        if binning == "width":
            import torch
            from monai.metrics import CalibrationErrorMetric

            metric = CalibrationErrorMetric(num_bins=n_bins, calibration_reduction="expected", metric_reduction="mean")
            # MONAI's layout is (batch, channel, spatial...): one item, one channel, the images along "space".
            metric(y_pred=torch.as_tensor(p, dtype=torch.float32).view(1, 1, -1),
                   y=torch.as_tensor(y, dtype=torch.float32).view(1, 1, -1))
            out[k] = float(metric.aggregate())
        else:
            out[k] = float(_weighted_ece(p, y, np.ones((1, p.size)), n_bins, binning)[0])
    return out


def bootstrap_ece_ci(probs: np.ndarray, labels: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                     groups: np.ndarray | None = None, n_bins: int = ECE_BINS, binning: str = "width",
                     ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Percentile bootstrap interval of every finding's ECE and of their mean: ``(lo[K], hi[K], mean_lo, mean_hi)``.

    Resampled as :func:`agcnn.metrics.bootstrap_auc_ci` resamples (whole patients with
    ``groups``; the same seed gives the same draws), so the two intervals describe the same
    resamples. The mean covers the findings with both label values (those with an AUC).

    ECE is biased upward, and more so in a resample, whose repeated images count as fewer
    distinct ones: for a well-calibrated model the interval can lie above the value itself. It
    is the spread of the ECE over resamples, not an interval that can contain zero.
    """
    probs, labels = check_scores(probs, labels)
    _check_bins(n_bins, binning)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}; 0.05 gives a 95% interval")
    n, k = probs.shape
    weights = resample_weights(n_boot, n, seed=seed, groups=groups)
    boot = np.full((n_boot, k), np.nan)
    for c in range(k):
        seen = ~np.isnan(labels[:, c])
        if seen.any():
            boot[:, c] = _weighted_ece(probs[seen, c], labels[seen, c], weights[:, seen], n_bins, binning)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    both = np.array([_has_both(labels[:, c]) for c in range(k)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, q, axis=0)
        mean_lo, mean_hi = (np.nanpercentile(np.nanmean(boot[:, both], axis=1), q) if both.any() else (np.nan, np.nan))
    return lo, hi, float(mean_lo), float(mean_hi)


def _has_both(y: np.ndarray) -> bool:
    y = y[~np.isnan(y)]
    return bool(y.size) and y.min() != y.max()


def mean_over_findings(values: np.ndarray, labels: np.ndarray) -> float:
    """Mean of a per-finding value over the findings with both label values; NaN when none has."""
    labels = np.asarray(labels, dtype=np.float64)
    both = [k for k in range(labels.shape[1]) if _has_both(labels[:, k]) and not math.isnan(values[k])]
    return float(np.mean([values[k] for k in both])) if both else float("nan")


def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width reliability bins of one finding (MONAI's ``calibration_binning``):
    ``(mean probability, fraction positive, count)`` per bin, NaN for an empty bin."""
    import torch
    from monai.metrics.calibration import calibration_binning

    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    seen = ~np.isnan(y)
    mean_p, mean_y, counts = calibration_binning(torch.as_tensor(p[seen], dtype=torch.float32).view(1, 1, -1),
                                                 torch.as_tensor(y[seen], dtype=torch.float32).view(1, 1, -1),
                                                 num_bins=n_bins)
    return mean_p[0, 0].numpy().astype(np.float64), mean_y[0, 0].numpy().astype(np.float64), counts[0, 0].numpy()


# ---------------------------------------------------------------------- maps

def _logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` in float64; +-inf for 0 and 1 (so those stay 0 and 1 under every map)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def _expit(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


def _fit_logistic(x: np.ndarray, y: np.ndarray, *, intercept: bool) -> tuple[float, float]:
    """Slope ``a > 0`` (and intercept ``b``) of ``sigmoid(a x + b)`` fitted to Platt's smoothed targets."""
    from scipy.optimize import minimize

    x = np.clip(x, -_FIT_CLIP, _FIT_CLIP)
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[0], (theta[1] if intercept else 0.0)
        z = a * x + b
        r = _expit(z) - t
        grad = [float((r * x).sum())] + ([float(r.sum())] if intercept else [])
        return float((np.logaddexp(0.0, z) - t * z).sum()), np.array(grad)

    start = np.array([1.0, 0.0] if intercept else [1.0])
    # The slope is kept positive, so the map stays increasing; its bounds are far outside any sane fit.
    bounds = [(1e-4, 1e4)] + ([(None, None)] if intercept else [])
    res = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return float(res.x[0]), float(res.x[1]) if intercept else 0.0


def fit_map(p: np.ndarray, y: np.ndarray, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """The monotone map of one finding fitted on raw probabilities ``p`` and labels ``y`` (NaN: left out).

    A plain dictionary (it travels in the checkpoint): ``{"kind": ..., parameters...}``; an
    ``identity`` map with ``reason`` when the set has too few positives or negatives.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r} is not known; use one of {list(METHODS)}")
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    seen = ~np.isnan(y)
    p, y = p[seen], y[seen]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < MIN_EACH:
        return {"kind": "identity", "reason": f"{n_pos} positives and {n_neg} negatives in the calibration data; "
                                              f"a map needs at least {MIN_EACH} of each", "positives": n_pos, "negatives": n_neg}
    x = _logit(p)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(np.clip(x, -_FIT_CLIP, _FIT_CLIP), y)
        return {"kind": "isotonic", "x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_],
                "blend": ISOTONIC_BLEND, "positives": n_pos, "negatives": n_neg}
    a, b = _fit_logistic(x, y, intercept=method == "platt")
    if method == "temperature":
        return {"kind": "temperature", "temperature": 1.0 / a, "positives": n_pos, "negatives": n_neg}
    return {"kind": "platt", "a": a, "b": b, "positives": n_pos, "negatives": n_neg}


def apply_map(m: Mapping[str, Any], p: np.ndarray) -> np.ndarray:
    """A map of :func:`fit_map` applied to raw probabilities (float64 out)."""
    p = np.asarray(p, dtype=np.float64)
    kind = m.get("kind")
    if kind == "identity":
        return p.copy()
    x = _logit(p)
    if kind == "platt":
        return _expit(m["a"] * x + m["b"])
    if kind == "temperature":
        return _expit(x / m["temperature"])
    if kind == "isotonic":
        # np.interp holds the end values beyond the knots (and at +-inf), as out_of_bounds="clip".
        iso = np.interp(np.clip(x, -_FIT_CLIP, _FIT_CLIP), m["x"], m["y"])
        return (1.0 - m["blend"]) * iso + m["blend"] * p
    raise CalibrationError(f"calibration map kind {kind!r} is not known to this agcnn; upgrade agcnn or re-run agcnn calibrate")


def fit_calibration(probs: Mapping[str, np.ndarray], labels: np.ndarray, names: Sequence[str],
                    method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """One map per branch and finding: ``{"method", "branches": {branch: {finding: map}}}``."""
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r} is not known; use one of {list(METHODS)}")
    labels = np.asarray(labels, dtype=np.float64)
    branches = {}
    for b, p in probs.items():
        p, _ = check_scores(p, labels)
        branches[b] = {name: fit_map(p[:, k], labels[:, k], method) for k, name in enumerate(names)}
    return {"method": method, "branches": branches}


def calibration_id(record: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the maps, the method and the fitting data's digests."""
    content = {k: record[k] for k in ("method", "branches", "data") if k in record}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Calibration:
    """A checkpoint's calibration record, applied: raw probabilities -> calibrated probabilities.

    ``record``: ``{"id", "method", "branches": {branch: {finding: map}}, "data": {...}}`` as
    ``agcnn calibrate`` stores it under ``calibration`` in a checkpoint.
    """

    def __init__(self, record: Mapping[str, Any], labels: Sequence[str]):
        if not isinstance(record, Mapping) or "branches" not in record or "id" not in record:
            raise CalibrationError("the checkpoint's calibration record is incomplete (no maps or no id); re-run agcnn calibrate")
        self.record = dict(record)
        self.labels = list(labels)
        for b, maps in record["branches"].items():
            missing = [n for n in self.labels if n not in maps]
            if missing:
                raise CalibrationError(f"the calibration has no {b} map for {missing}; re-run agcnn calibrate for this checkpoint")

    @classmethod
    def of(cls, ckpt: Mapping[str, Any]) -> Calibration | None:
        """The calibration a loaded checkpoint carries, or None."""
        record = ckpt.get("calibration")
        return None if record is None else cls(record, ckpt["labels"])

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def method(self) -> str:
        return str(self.record.get("method"))

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(self.record["branches"])

    def describe(self) -> dict[str, Any]:
        """What outputs say about the calibration they used: id, method and the data it was fitted on."""
        data = self.record.get("data") or {}
        return {"id": self.id, "method": self.method,
                "data": {k: data.get(k) for k in ("name", "source", "images", "patients", "fitted")}}

    def summary(self) -> str:
        """One line: ``platt calibration 1a2b3c4d5e6f (fitted on the val split, 240 images)``."""
        d = self.record.get("data") or {}
        return f"{self.method} calibration {self.id} (fitted on {d.get('name', 'unknown data')}, {d.get('images', '?')} images)"

    def apply_one(self, p: np.ndarray, branch: str, finding: str) -> np.ndarray:
        """One finding's calibrated probabilities (float64); unchanged for a branch without maps."""
        maps = self.record["branches"].get(branch)
        return np.asarray(p, dtype=np.float64).copy() if maps is None else apply_map(maps[finding], p)

    def apply(self, probs: np.ndarray, branch: str) -> np.ndarray:
        """Calibrated ``[N, K]`` float64 probabilities of ``branch``; a branch without maps is returned unchanged."""
        probs = np.asarray(probs, dtype=np.float64)
        maps = self.record["branches"].get(branch)
        if maps is None:
            return probs.copy()
        if probs.ndim != 2 or probs.shape[1] != len(self.labels):
            raise CalibrationError(f"calibrating {branch} probabilities of shape {probs.shape}: expected [N, {len(self.labels)}]")
        return np.stack([apply_map(maps[n], probs[:, k]) for k, n in enumerate(self.labels)], axis=1) if len(probs) else probs.copy()


# ---------------------------------------------------------------------- operating points

def _weighted_roc(p: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descending distinct scores ``[G]`` and, per resample, the sensitivity and false-positive
    rate of calling ``p >= score`` (``[B, G]`` each)."""
    order = np.argsort(-p, kind="stable")
    ps, pos, w = p[order], y[order] == 1, weights[:, order]
    last = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(np.where(pos, w, 0.0), axis=1)[:, last]
    fp = np.cumsum(np.where(pos, 0.0, w), axis=1)[:, last]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ps[last], tp / tp[:, -1:], fp / fp[:, -1:]


def _thresholds(scores: np.ndarray, sens: np.ndarray, fpr: np.ndarray, rule: str, target: float | None) -> np.ndarray:
    """The rule's threshold per resample (rows of ``sens`` / ``fpr``)."""
    never = float(np.nextafter(scores[0], np.inf))  # above every score: nothing is called positive
    if rule == "youden":
        j = sens - fpr
        best = np.argmax(j, axis=1)  # the first maximum: the highest threshold with the best J
        ok = j[np.arange(len(j)), best] > 0
    elif rule == "sensitivity":
        reach = sens >= target - 1e-12
        best = np.argmax(reach, axis=1)  # the highest threshold that reaches the target: best specificity
        ok = reach.any(axis=1)
    else:
        # The lowest threshold whose specificity still reaches the target: the best sensitivity.
        keep = (1.0 - fpr) >= target - 1e-12
        best = keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
        ok = keep.any(axis=1)
    return np.where(ok, scores[best], never)


def operating_points(probs: np.ndarray, labels: np.ndarray, names: Sequence[str], *, rule: str = "youden",
                     target: float | None = None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                     groups: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Per finding the threshold of ``rule`` (``youden``; ``sensitivity`` / ``specificity`` with a
    ``target`` in (0, 1)) and, with ``n_boot`` resamples, percentile intervals of the threshold
    (the rule re-applied in each resample) and of the sensitivity and specificity at the chosen
    threshold. ``threshold`` is None for a finding with only one label value.
    """
    if rule not in RULES:
        raise CalibrationError(f"operating-point rule {rule!r} is not known; use one of {list(RULES)}")
    if rule != "youden" and (target is None or not 0.0 < target < 1.0):
        raise CalibrationError(f"a {rule} target must lie strictly between 0 and 1 (e.g. 0.9), got {target!r}")
    probs, labels = check_scores(probs, labels)
    n = len(probs)
    weights = resample_weights(n_boot, n, seed=seed, groups=groups) if n_boot > 0 else None
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out = {}
    for k, name in enumerate(names):
        seen = ~np.isnan(labels[:, k])
        p, y = probs[seen, k], labels[seen, k]
        r: dict[str, Any] = {"rule": rule, "target": target, "threshold": None, "threshold_ci": [None, None],
                             "sensitivity": None, "sensitivity_ci": [None, None],
                             "specificity": None, "specificity_ci": [None, None]}
        if not _has_both(y):
            out[name] = r
            continue
        scores, sens, fpr = _weighted_roc(p, y, np.ones((1, p.size)))
        t = float(_thresholds(scores, sens, fpr, rule, target)[0])
        called, pos = p >= t, y == 1
        r.update(threshold=t, sensitivity=float(called[pos].mean()), specificity=float((~called[~pos]).mean()))
        if weights is not None:
            w = weights[:, seen]
            _, bs, bf = _weighted_roc(p, y, w)
            with np.errstate(invalid="ignore", divide="ignore"):
                ts = _thresholds(scores, bs, bf, rule, target)
                sens_at = (w * (called & pos)).sum(axis=1) / (w * pos).sum(axis=1)
                spec_at = (w * (~called & ~pos)).sum(axis=1) / (w * ~pos).sum(axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                # A resample without positives (or negatives) has no ROC: it gives no value.
                valid = np.isfinite(bs[:, -1]) & np.isfinite(bf[:, -1])
                r["threshold_ci"] = [float(v) for v in np.nanpercentile(np.where(valid, ts, np.nan), q)]
                r["sensitivity_ci"] = [float(v) for v in np.nanpercentile(sens_at, q)]
                r["specificity_ci"] = [float(v) for v in np.nanpercentile(spec_at, q)]
        out[name] = r
    return out


# ---------------------------------------------------------------------- what a report holds

def json_value(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def ece_summary(probs: np.ndarray, labels: np.ndarray, names: Sequence[str], *, n_boot: int = 0, seed: int = 0,
                alpha: float = 0.05, groups: np.ndarray | None = None, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """``{binning: {"ece": {finding: v}, "lo": {...}, "hi": {...}, "mean": v, "mean_ci": [lo, hi]}, "bins": n}``
    for both binnings (JSON-ready; None for no value). The mean covers the findings with both label values."""
    out: dict[str, Any] = {"bins": n_bins}
    for binning in BINNINGS:
        e = ece(probs, labels, n_bins=n_bins, binning=binning)
        r = {"ece": {n: json_value(v) for n, v in zip(names, e)}, "lo": {n: None for n in names}, "hi": {n: None for n in names},
             "mean": json_value(mean_over_findings(e, labels)), "mean_ci": [None, None]}
        if n_boot > 0:
            lo, hi, mlo, mhi = bootstrap_ece_ci(probs, labels, n_boot=n_boot, seed=seed, alpha=alpha, groups=groups,
                                                n_bins=n_bins, binning=binning)
            r["lo"] = {n: json_value(v) for n, v in zip(names, lo)}
            r["hi"] = {n: json_value(v) for n, v in zip(names, hi)}
            r["mean_ci"] = [json_value(mlo), json_value(mhi)]
        out[binning] = r
    return out
