"""Metrics: per-class ROC AUC, bootstrap confidence intervals, operating points, the masked loss.

Conventions shared by every function here:

* ``probs`` is ``[N, K]`` (N images, K labels, in the label-list order); ``labels`` is ``[N, K]``
  with 1 = positive, 0 = negative and NaN = missing. A missing label is dropped for that class
  only; it is never read as a negative.
* A class whose observed labels are all 0 or all 1 has no AUC: it is NaN (as in torchxrayvision),
  never an exception, and :func:`mean_auc` leaves it out. Reports should say how many classes
  the mean covers.
* Scores are compared with ``>=``: an operating point ``t`` calls an image positive when
  ``prob >= t`` (the convention of ``sklearn.metrics.roc_curve``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "per_class_auc",
    "mean_auc",
    "bootstrap_auc_ci",
    "paired_bootstrap_mean_auc_difference",
    "youden_thresholds",
    "masked_bce_with_logits",
    "with_no_finding",
    "resample_weights",
]

# Bootstrap weights are processed in blocks of at most this many cells (resamples x images), so a
# 25,596-image test set with 1,000 resamples needs tens of MB, not gigabytes.
_BLOCK_CELLS = 2_000_000


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if labels.ndim == 1:
        labels = labels[:, None]
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(
            f"probs and labels must both be [N, K] arrays of the same shape, got {probs.shape} and {labels.shape}"
        )
    if not np.isfinite(probs).all():
        r, c = np.argwhere(~np.isfinite(probs))[0]
        raise ValueError(
            f"probs[{r}, {c}] is {float(probs[r, c])}; scores must be finite (a NaN score usually means the model "
            f"diverged or an image failed to load)"
        )
    observed = labels[~np.isnan(labels)]
    if not np.isin(observed, (0.0, 1.0)).all():
        bad = observed[~np.isin(observed, (0.0, 1.0))][0]
        raise ValueError(f"labels must be 1 (positive), 0 (negative) or NaN (missing), found {float(bad):g}")
    return probs, labels


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one class under each row of ``weights`` ([B, n] non-negative image counts).

    The Mann-Whitney statistic: the chance that a positive outscores a negative, ties counting
    one half. That is exactly the area under the empirical ROC curve (``roc_auc_score``), and with
    integer weights it equals the AUC of the data set that repeats image ``i`` ``weights[b, i]``
    times, which is what a bootstrap resample is. The scores are sorted once; each resample is
    then a few cumulative sums, with no per-resample sort.
    """
    order = np.argsort(scores, kind="stable")
    scores, positive = scores[order], positive[order]
    weights = weights[:, order]
    n = scores.size
    # Tied scores form one group [start, end): a positive beats every negative of the groups
    # below it and ties (one half) with the negatives of its own group.
    new_group = np.r_[True, scores[1:] != scores[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    group = np.cumsum(new_group) - 1
    # neg_upto[:, j]: negative weight among the first j sorted images.
    neg_upto = np.zeros((weights.shape[0], n + 1))
    np.cumsum(np.where(positive, 0.0, weights), axis=1, out=neg_upto[:, 1:])
    g = group[positive]
    below, through = neg_upto[:, starts[g]], neg_upto[:, ends[g]]
    pos_w = weights[:, positive]
    u = (pos_w * (0.5 * (below + through))).sum(axis=1)
    n_pairs = pos_w.sum(axis=1) * neg_upto[:, n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, u / np.where(n_pairs > 0, n_pairs, 1.0), np.nan)


def per_class_auc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of every class, ``[K]``; NaN for a class with only one observed label value.

    Equal to ``sklearn.metrics.roc_auc_score`` per class on the rows where that class is observed.
    """
    probs, labels = _check(probs, labels)
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        seen = ~np.isnan(labels[:, k])
        out[k] = _weighted_auc(probs[seen, k], labels[seen, k] == 1, np.ones((1, int(seen.sum()))))[0]
    return out


def mean_auc(aucs: np.ndarray) -> float:
    """Mean over the classes that have an AUC; NaN when none has."""
    aucs = np.asarray(aucs, dtype=np.float64)
    if aucs.size == 0 or np.isnan(aucs).all():
        return float("nan")
    return float(np.nanmean(aucs))


def _resample_weights(
    rng: np.random.Generator, n_boot: int, n: int, groups: np.ndarray | None
) -> np.ndarray:
    """How often each image appears in each of ``n_boot`` resamples, ``[n_boot, n]``."""
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        offsets = (np.arange(n_boot) * n)[:, None]
        return np.bincount((idx + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    # Cluster bootstrap: draw patients with replacement and take all of a drawn patient's images.
    _, group_of = np.unique(groups, return_inverse=True)
    g = int(group_of.max()) + 1
    idx = rng.integers(0, g, size=(n_boot, g))
    offsets = (np.arange(n_boot) * g)[:, None]
    counts = np.bincount((idx + offsets).ravel(), minlength=n_boot * g).reshape(n_boot, g)
    return counts[:, group_of].astype(np.float64)


def resample_weights(n_boot: int, n: int, *, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """``[n_boot, n]`` counts of each image in each bootstrap resample (whole patients with
    ``groups``), for statistics other than the AUC that are resampled the same way."""
    groups = _check_bootstrap(n_boot, 0.05, groups, n)
    return _resample_weights(np.random.default_rng(seed), n_boot, n, groups)


def _check_bootstrap(n_boot: int, alpha: float, groups: np.ndarray | None, n: int) -> np.ndarray | None:
    """The bootstrap's own arguments checked; ``groups`` as an array of one patient ID per row."""
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}; 1000 is customary")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}; 0.05 gives a 95% interval")
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one patient ID per row ({n}), got shape {groups.shape}")
    return groups


def bootstrap_auc_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Percentile bootstrap interval of every class AUC and of the mean AUC.

    Images (rows) are resampled with replacement, the same draw for every class, so the interval
    of the mean reflects how the classes move together. With ``groups`` (one patient ID per
    row), whole patients are resampled instead: a patient's follow-up images are correlated, and
    treating them as independent makes the interval too narrow.

    A resample in which a class has only one label value gives that class no AUC; the interval
    uses the resamples where it has one (NaN if none). The mean AUC of a resample is the mean over
    the classes that have an AUC in the full data set and in that resample.

    Returns ``(lo[K], hi[K], mean_lo, mean_hi)``; the same ``seed`` gives the same interval.
    """
    probs, labels = _check(probs, labels)
    n, k = probs.shape
    groups = _check_bootstrap(n_boot, alpha, groups, n)
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, k), np.nan)
    observed = [~np.isnan(labels[:, c]) for c in range(k)]
    # Resamples are drawn and scored block by block; the blocks are the same for a given N, so a
    # seed always gives the same interval.
    block = max(1, _BLOCK_CELLS // max(n, 1))
    for b0 in range(0, n_boot, block):
        weights = _resample_weights(rng, min(block, n_boot - b0), n, groups)
        for c, seen in enumerate(observed):
            if seen.any():
                boot[b0 : b0 + len(weights), c] = _weighted_auc(probs[seen, c], labels[seen, c] == 1, weights[:, seen])

    point = per_class_auc(probs, labels)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the class has no AUC
        lo, hi = np.nanpercentile(boot, q, axis=0)
        # Classes without a full-data AUC stay out of the mean, as in mean_auc.
        means = np.nanmean(np.where(np.isnan(point)[None, :], np.nan, boot), axis=1)
        mean_lo, mean_hi = np.nanpercentile(means, q)
    return lo, hi, float(mean_lo), float(mean_hi)


def paired_bootstrap_mean_auc_difference(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Mean AUC of ``probs_a`` minus that of ``probs_b`` on the same images, with a paired
    percentile bootstrap interval: ``(difference, lo, hi)``.

    Both score sets are scored on every resample (the same images, or with ``groups`` the same
    whole patients), so the interval measures how the *difference* varies, which is much
    narrower than the two separate intervals suggest when the two models err on the same images.
    The mean covers the classes that have an AUC in the full data (as :func:`mean_auc`), and in
    each resample the classes that have one there.
    """
    pa, labels = _check(probs_a, labels)
    pb, _ = _check(probs_b, labels)
    n, k = pa.shape
    groups = _check_bootstrap(n_boot, alpha, groups, n)
    keep = ~np.isnan(per_class_auc(pa, labels)) & ~np.isnan(per_class_auc(pb, labels))
    if not keep.any():
        raise ValueError("no class has both label values in these images; there is no AUC to compare")
    diff = float(np.mean(per_class_auc(pa, labels)[keep] - per_class_auc(pb, labels)[keep]))
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, 2, k), np.nan)
    block = max(1, _BLOCK_CELLS // max(n, 1))
    for b0 in range(0, n_boot, block):
        weights = _resample_weights(rng, min(block, n_boot - b0), n, groups)
        for c in np.flatnonzero(keep):
            seen = ~np.isnan(labels[:, c])
            for i, p in enumerate((pa, pb)):
                boot[b0 : b0 + len(weights), i, c] = _weighted_auc(p[seen, c], labels[seen, c] == 1, weights[:, seen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class without an AUC in a resample
        # Per resample, the classes both score sets have an AUC for (always the same ones).
        deltas = np.nanmean(boot[:, 0, keep] - boot[:, 1, keep], axis=1)
        lo, hi = np.nanpercentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return diff, float(lo), float(hi)


def youden_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class threshold that maximises Youden's J = sensitivity + specificity - 1, ``[K]``.

    Pick these on the validation set, never on test. An image is positive when ``prob >= t``.
    NaN for a class with only one observed label value. When no threshold beats chance (J <= 0
    everywhere) the result is just above the highest score, i.e. "never positive".
    """
    from sklearn.metrics import roc_curve

    probs, labels = _check(probs, labels)
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        seen = ~np.isnan(labels[:, c])
        y = labels[seen, c]
        if y.size == 0 or y.min() == y.max():
            continue
        fpr, tpr, thr = roc_curve(y, probs[seen, c], drop_intermediate=False)
        # argmax takes the first maximum, i.e. the highest threshold with the best J.
        best = int(np.argmax(tpr - fpr))
        t = float(thr[best])
        # roc_curve's first threshold is +inf ("nothing positive"); keep the value finite for JSON.
        out[c] = t if np.isfinite(t) else float(np.nextafter(probs[seen, c].max(), np.inf))
    return out


def masked_bce_with_logits(logits: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """``BCEWithLogits`` averaged over the observed (non-NaN) labels only.

    A missing label contributes neither loss nor gradient. With no observed label at all the
    result is a zero that still carries a graph, so ``loss.backward()`` works on any batch.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels must have the same shape, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    observed = ~torch.isnan(labels)
    # The NaN targets are replaced before the loss, not after: NaN * 0 is still NaN.
    target = torch.where(observed, labels, torch.zeros_like(labels)).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    mask = observed.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def with_no_finding(labels: Tensor) -> Tensor:
    """``[N, K]`` finding labels -> ``[N, K + 1]`` with the paper's "No Finding" target appended.

    No Finding is 1 when every finding is observed negative, 0 when any is positive, and missing
    (NaN) when none is positive but some are missing: the image may hold the missing one.
    """
    positive = (labels == 1).any(dim=1)
    all_negative = (labels == 0).all(dim=1)
    nf = torch.where(positive, torch.zeros_like(labels[:, 0]), torch.full_like(labels[:, 0], float("nan")))
    nf = torch.where(all_negative, torch.ones_like(nf), nf)
    return torch.cat([labels, nf[:, None]], dim=1)
