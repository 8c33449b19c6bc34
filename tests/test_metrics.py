import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from agcnn.metrics import (
    bootstrap_auc_ci,
    masked_bce_with_logits,
    mean_auc,
    paired_bootstrap_mean_auc_difference,
    per_class_auc,
    youden_thresholds,
)


def _toy(n=300, k=5, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.3).astype(np.float64)
    # Two decimals: many tied scores, across and within the classes.
    probs = np.round(np.clip(0.35 * labels + rng.random((n, k)) * 0.65, 0, 1), 2)
    if missing:
        labels[rng.random((n, k)) < missing] = np.nan
    return probs, labels


def test_auc_equals_sklearn_with_ties_and_missing_labels():
    probs, labels = _toy(missing=0.2)
    got = per_class_auc(probs, labels)
    for k in range(labels.shape[1]):
        seen = ~np.isnan(labels[:, k])
        assert got[k] == pytest.approx(roc_auc_score(labels[seen, k], probs[seen, k]), abs=1e-12)


def test_auc_all_tied_scores_is_one_half():
    labels = np.array([[0.0], [1.0], [0.0], [1.0]])
    assert per_class_auc(np.full((4, 1), 0.3), labels)[0] == 0.5


def test_missing_labels_are_dropped_not_read_as_negative():
    probs = np.array([[0.9], [0.1], [0.95], [0.2]])
    labels = np.array([[1.0], [0.0], [np.nan], [0.0]])
    # Read as a negative, the 0.95 image would drag the AUC below 1.
    assert per_class_auc(probs, labels)[0] == 1.0


def test_single_valued_class_is_nan_and_left_out_of_mean():
    probs, labels = _toy(k=3)
    labels[:, 1] = 0.0
    labels[:5, 2] = np.nan
    labels[5:, 2] = 1.0
    aucs = per_class_auc(probs, labels)
    assert np.isnan(aucs[1]) and np.isnan(aucs[2]) and not np.isnan(aucs[0])
    assert mean_auc(aucs) == aucs[0]
    assert np.isnan(mean_auc(np.array([np.nan, np.nan])))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        per_class_auc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        per_class_auc(np.array([[np.nan], [0.2]]), np.array([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="found 2"):
        per_class_auc(np.zeros((2, 1)), np.array([[0.0], [2.0]]))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    probs, labels = _toy(missing=0.1)
    a = bootstrap_auc_ci(probs, labels, n_boot=300, seed=7)
    b = bootstrap_auc_ci(probs, labels, n_boot=300, seed=7)
    c = bootstrap_auc_ci(probs, labels, n_boot=300, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    lo, hi, mlo, mhi = a
    point = per_class_auc(probs, labels)
    assert np.all(lo <= point) and np.all(point <= hi) and np.all(lo < hi)
    assert mlo <= mean_auc(point) <= mhi


def test_bootstrap_matches_explicit_resampling():
    """The weighted fast path equals resampling rows and calling sklearn on each resample."""
    probs, labels = _toy(n=80, k=2, missing=0.1)
    n_boot, seed = 50, 3
    lo, hi, _, _ = bootstrap_auc_ci(probs, labels, n_boot=n_boot, seed=seed, alpha=0.2)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(probs), size=(n_boot, len(probs)))
    for k in range(2):
        aucs = []
        for rows in idx:
            y, p = labels[rows, k], probs[rows, k]
            seen = ~np.isnan(y)
            aucs.append(roc_auc_score(y[seen], p[seen]))
        assert (lo[k], hi[k]) == pytest.approx(tuple(np.percentile(aucs, [10, 90])), abs=1e-12)


def test_patient_bootstrap_is_wider_when_images_repeat_per_patient():
    base_p, base_y = _toy(n=100, k=2, seed=1)
    # Every patient contributes five identical images: 100 independent units, not 500.
    probs, labels, groups = np.repeat(base_p, 5, axis=0), np.repeat(base_y, 5, axis=0), np.repeat(np.arange(100), 5)
    img = bootstrap_auc_ci(probs, labels, n_boot=400, seed=0)
    pat = bootstrap_auc_ci(probs, labels, n_boot=400, seed=0, groups=groups)
    assert np.all(pat[1] - pat[0] > 1.5 * (img[1] - img[0]))


def test_bootstrap_argument_errors():
    probs, labels = _toy(n=20, k=1)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auc_ci(probs, labels, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_auc_ci(probs, labels, alpha=1.5)
    with pytest.raises(ValueError, match="one patient ID per row"):
        bootstrap_auc_ci(probs, labels, groups=np.arange(3))


def test_youden_on_separable_toy_case():
    probs = np.array([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5], [0.7, 0.5], [0.8, 0.5], [0.9, 0.5]])
    labels = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0]], dtype=float)
    t = youden_thresholds(probs, labels)
    # Any t in (0.3, 0.7] separates perfectly; roc_curve's candidates are the scores themselves.
    assert t[0] == pytest.approx(0.7)
    assert np.isnan(t[1])
    assert ((probs[:, 0] >= t[0]) == (labels[:, 0] == 1)).all()


def test_youden_without_signal_stays_finite():
    probs = np.array([[0.9], [0.8], [0.2], [0.1]])
    labels = np.array([[0.0], [0.0], [1.0], [1.0]])  # anti-correlated: nothing beats chance
    t = youden_thresholds(probs, labels)[0]
    assert np.isfinite(t) and t > 0.9


def test_masked_bce_equals_bce_on_fully_observed_labels():
    torch.manual_seed(0)
    logits = torch.randn(6, 14)
    labels = (torch.rand(6, 14) < 0.3).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert torch.allclose(masked_bce_with_logits(logits, labels), ref)


def test_masked_bce_ignores_missing_entries():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")], [1.0, 1.0, 0.0], [float("nan")] * 3])
    loss = masked_bce_with_logits(logits, labels)
    observed = ~torch.isnan(labels)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[observed], labels[observed])
    assert torch.allclose(loss, ref)
    # Perturbing a logit whose label is missing changes neither the loss nor its gradient.
    bumped = logits.detach().clone()
    bumped[0, 1] += 100.0
    assert torch.equal(masked_bce_with_logits(bumped, labels), loss.detach())
    loss.backward()
    assert torch.all(logits.grad[~observed] == 0) and torch.all(logits.grad[observed] != 0)


def test_masked_bce_with_nothing_observed_is_zero_with_grad():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.full((2, 3), float("nan")))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_paired_difference_matches_explicit_resampling():
    """Both score sets on the same resampled rows, sklearn per resample, mean over classes."""
    probs, labels = _toy(n=80, k=3, missing=0.1)
    other = np.round(np.clip(probs + np.random.default_rng(5).normal(0, 0.2, probs.shape), 0, 1), 2)
    n_boot, seed = 60, 4
    diff, lo, hi = paired_bootstrap_mean_auc_difference(probs, other, labels, n_boot=n_boot, seed=seed, alpha=0.2)
    assert diff == pytest.approx(mean_auc(per_class_auc(probs, labels)) - mean_auc(per_class_auc(other, labels)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(probs), size=(n_boot, len(probs)))
    deltas = []
    for rows in idx:
        d = []
        for k in range(3):
            y = labels[rows, k]
            seen = ~np.isnan(y)
            d.append(roc_auc_score(y[seen], probs[rows, k][seen]) - roc_auc_score(y[seen], other[rows, k][seen]))
        deltas.append(np.mean(d))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(deltas, [10, 90])), abs=1e-12)


def test_paired_interval_is_narrower_than_either_branch_interval():
    probs, labels = _toy(n=200, k=4, seed=2)
    # A second model that agrees with the first up to a small shift on the positives.
    better = np.clip(probs + 0.05 * labels, 0, 1)
    diff, lo, hi = paired_bootstrap_mean_auc_difference(better, probs, labels, n_boot=400, seed=0)
    _, _, mlo, mhi = bootstrap_auc_ci(probs, labels, n_boot=400, seed=0)
    assert diff > 0 and 0 < lo <= diff <= hi
    assert hi - lo < 0.5 * (mhi - mlo)
    same = paired_bootstrap_mean_auc_difference(probs, probs, labels, n_boot=50, seed=0)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap_mean_auc_difference(probs, probs, labels, groups=np.arange(3))


def test_no_finding_target():
    from agcnn.metrics import with_no_finding

    nan = float("nan")
    y = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, nan], [0.0, nan, 0.0], [nan, 1.0, 1.0]])
    out = with_no_finding(y)
    assert torch.equal(out[:, :3].nan_to_num(-1), y.nan_to_num(-1))
    # All negative -> 1; any positive -> 0; no positive but something missing -> missing.
    assert out[:, 3].nan_to_num(-1).tolist() == [1.0, 0.0, -1.0, 0.0]
