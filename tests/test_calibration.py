"""The calibration math (agcnn.calibration, agcnn.drift): ECE against MONAI and by hand, the maps, operating
points with intervals, and the site-shift measures -- on generated scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from agcnn import calibration as C
from agcnn import drift as D
from agcnn.metrics import per_class_auc, youden_thresholds

NAMES = ["a", "b", "c"]


def scores(n: int, scale: float = 1.0, seed: int = 0):
    """Labels drawn from sigmoid(z); probabilities sigmoid(scale * z) as float32 (scale > 1: over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 3)) + np.array([0.0, -1.5, 1.0])
    y = (rng.random((n, 3)) < expit(z)).astype(float)
    return expit(scale * z).astype(np.float32).astype(np.float64), y


def record(probs, labels, method):
    rec = C.fit_calibration({"fusion": probs}, labels, NAMES, method)
    rec["id"] = C.calibration_id(rec)
    return C.Calibration(rec, NAMES)


def test_ece_by_hand_for_both_binnings():
    p = np.array([0.1, 0.2, 0.8, 0.9])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    # Two bins either way: {0.1, 0.2} (mean 0.15, half positive) and {0.8, 0.9} (mean 0.85, all positive).
    for binning in C.BINNINGS:
        assert C.ece(p, y, n_bins=2, binning=binning)[0] == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
    # Equal mass splits by rank where equal width does not: three of four below 0.5.
    p2, y2 = np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.0, 0.0, 1.0, 1.0])
    assert C.ece(p2, y2, n_bins=2, binning="width")[0] == pytest.approx(0.75 * abs(0.2 - 1 / 3) + 0.25 * 0.1)
    assert C.ece(p2, y2, n_bins=2, binning="mass")[0] == pytest.approx(0.5 * 0.15 + 0.5 * 0.4)


def test_equal_width_ece_is_monais_and_the_bootstrap_kernel_agrees():
    import torch
    from monai.metrics import CalibrationErrorMetric

    p, y = scores(3000, scale=3.0)
    y[:7, 1] = np.nan  # missing labels are left out of that finding only
    got = C.ece(p, y)
    for k in range(3):
        seen = ~np.isnan(y[:, k])
        m = CalibrationErrorMetric(num_bins=C.ECE_BINS)
        m(y_pred=torch.tensor(p[seen, k], dtype=torch.float32).view(1, 1, -1), y=torch.tensor(y[seen, k]).float().view(1, 1, -1))
        assert got[k] == pytest.approx(float(m.aggregate()), abs=1e-6)
        for binning in C.BINNINGS:
            kernel = C._weighted_ece(p[seen, k], y[seen, k], np.ones((1, int(seen.sum()))), C.ECE_BINS, binning)[0]
            assert kernel == pytest.approx(C.ece(p[:, k], y[:, k], binning=binning)[0], abs=1e-6)


def test_ece_separates_calibrated_from_over_confident_scores():
    good, y = scores(20000, scale=1.0)
    bad, _ = scores(20000, scale=4.0)
    for binning in C.BINNINGS:
        assert C.ece(good, y, binning=binning).max() < 0.02
        assert C.ece(bad, y, binning=binning).min() > 0.10


def test_bootstrap_interval_brackets_the_value_and_patients_widen_it():
    p, y = scores(600, scale=2.0)
    point = C.ece(p, y)
    lo, hi, mlo, mhi = C.bootstrap_ece_ci(p, y, n_boot=300, seed=1)
    assert (lo <= point + 1e-9).all() and (point <= hi + 1e-9).all() and mlo < point.mean() < mhi
    again = C.bootstrap_ece_ci(p, y, n_boot=300, seed=1)
    np.testing.assert_array_equal(lo, again[0])
    # Ten copies of each of 60 patients: resampling images pretends there are 600 independent ones.
    p10, y10 = np.repeat(p[:60], 10, axis=0), np.repeat(y[:60], 10, axis=0)
    groups = np.repeat(np.arange(60), 10)
    img = C.bootstrap_ece_ci(p10, y10, n_boot=300, seed=0)
    pat = C.bootstrap_ece_ci(p10, y10, n_boot=300, seed=0, groups=groups)
    assert (pat[1] - pat[0]).mean() > 1.5 * (img[1] - img[0]).mean()


@pytest.mark.parametrize("method", C.METHODS)
def test_every_map_fixes_over_confidence_and_keeps_every_auc(method):
    fit_p, fit_y = scores(4000, scale=4.0, seed=1)
    test_p, test_y = scores(20000, scale=4.0, seed=2)
    cal = record(fit_p, fit_y, method)
    after = cal.apply(test_p, "fusion")
    assert C.ece(test_p, test_y).mean() > 0.15
    assert C.ece(after, test_y).mean() < 0.02, C.ece(after, test_y)
    # Strictly increasing: the same ranking, so identical AUCs (not merely close).
    np.testing.assert_array_equal(per_class_auc(after, test_y), per_class_auc(test_p, test_y))
    order = np.argsort(test_p[:, 0], kind="stable")
    assert (np.diff(after[order, 0]) >= 0).all()
    distinct = np.diff(test_p[order, 0]) > 0
    assert (np.diff(after[order, 0])[distinct] > 0).all()
    # Probabilities of exactly 0 and 1 stay there; a branch without maps is left alone.
    np.testing.assert_array_equal(cal.apply(np.array([[0.0, 1.0, 0.5]]), "global"), [[0.0, 1.0, 0.5]])
    edge = cal.apply(np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]]), "fusion")
    if method != "isotonic":
        np.testing.assert_array_equal(edge[:, :2], [[0.0, 1.0], [1.0, 0.0]])


def test_temperature_and_platt_recover_the_scale_they_undo():
    p, y = scores(40000, scale=3.0, seed=3)
    t = C.fit_map(p[:, 0], y[:, 0], "temperature")
    assert t["kind"] == "temperature" and t["temperature"] == pytest.approx(3.0, rel=0.05)
    pl = C.fit_map(p[:, 1], y[:, 1], "platt")
    assert pl["a"] == pytest.approx(1 / 3, rel=0.05) and pl["b"] == pytest.approx(0.0, abs=0.05)
    # A prevalence shift (labels drawn at logit + 1) is an intercept: Platt moves it, temperature cannot.
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.5, 40000)
    y2 = (rng.random(40000) < expit(z + 1.0)).astype(float)
    p2 = expit(z)
    assert C.fit_map(p2, y2, "platt")["b"] == pytest.approx(1.0, abs=0.05)
    assert C.ece(C.apply_map(C.fit_map(p2, y2, "platt"), p2), y2)[0] < 0.01
    assert C.ece(C.apply_map(C.fit_map(p2, y2, "temperature"), p2), y2)[0] > 0.05


def test_too_few_positives_leave_a_finding_uncalibrated_with_the_reason():
    p, y = scores(500)
    y[:, 2] = 0.0
    y[:3, 2] = 1.0
    cal = record(p, y, "platt")
    m = cal.record["branches"]["fusion"]["c"]
    assert m["kind"] == "identity" and "3 positives" in m["reason"]
    np.testing.assert_array_equal(cal.apply(p, "fusion")[:, 2], p[:, 2])


def test_bad_records_and_methods_are_refused_by_name():
    p, y = scores(200)
    with pytest.raises(C.CalibrationError, match="'sigmoid' is not known.*platt"):
        C.fit_map(p[:, 0], y[:, 0], "sigmoid")
    rec = C.fit_calibration({"fusion": p}, y, NAMES, "platt")
    with pytest.raises(C.CalibrationError, match="no maps or no id"):
        C.Calibration(rec, NAMES)
    rec["id"] = "x"
    with pytest.raises(C.CalibrationError, match=r"no fusion map for \['d'\]"):
        C.Calibration(rec, [*NAMES, "d"])
    rec["branches"]["fusion"]["a"] = {"kind": "spline"}
    with pytest.raises(C.CalibrationError, match="'spline' is not known"):
        C.Calibration(rec, NAMES).apply(p, "fusion")


def test_the_id_follows_maps_and_data():
    p, y = scores(400)
    rec = C.fit_calibration({"fusion": p}, y, NAMES, "platt")
    rec["data"] = {"images_sha256": "1"}
    a = C.calibration_id(rec)
    rec["data"] = {"images_sha256": "2"}
    assert C.calibration_id(rec) != a and len(a) == 12


def test_youden_points_match_metrics_and_targets_are_met():
    p, y = scores(2000, scale=2.0)
    ops = C.operating_points(p, y, NAMES, n_boot=0)
    np.testing.assert_allclose([ops[n]["threshold"] for n in NAMES], youden_thresholds(p, y))
    for rule, target in (("sensitivity", 0.9), ("specificity", 0.8)):
        ops = C.operating_points(p, y, NAMES, rule=rule, target=target, n_boot=200, seed=0)
        for k, n in enumerate(NAMES):
            r = ops[n]
            pos, t = y[:, k] == 1, r["threshold"]
            assert r[rule] >= target
            # The best threshold for the target: one step further loses it.
            nxt = p[:, k][p[:, k] > t].min() if rule == "sensitivity" else p[:, k][p[:, k] < t].max()
            called = p[:, k] >= nxt
            other = called[pos].mean() if rule == "sensitivity" else (~called[~pos]).mean()
            assert other < target
            assert r["threshold_ci"][0] <= t <= r["threshold_ci"][1]
            assert r["sensitivity_ci"][0] <= r["sensitivity"] <= r["sensitivity_ci"][1]
            assert r["specificity_ci"][0] <= r["specificity"] <= r["specificity_ci"][1]
    with pytest.raises(C.CalibrationError, match="strictly between 0 and 1"):
        C.operating_points(p, y, NAMES, rule="sensitivity", target=90)


def test_site_shift_flags_a_moved_population_and_ignores_monotone_maps():
    ref_p, ref_y = scores(3000, seed=5)
    ref = D.score_reference(ref_p, ref_y, NAMES)
    same_p, _ = scores(1500, seed=6)
    same = D.shift(ref, same_p, NAMES)
    assert all(r["flag"] == "-" and r["psi"] < 0.05 and r["ks"] < 0.06 for r in same.values()), same
    # A site where nearly every film has finding a: its scores move up.
    site_p, site_y = scores(6000, seed=7)
    keep = np.r_[np.flatnonzero(site_y[:, 0] == 1), np.flatnonzero(site_y[:, 0] == 0)[:100]]
    moved = D.shift(ref, site_p[keep], NAMES)
    assert moved["a"]["flag"] == "moved" and moved["a"]["psi"] > D.PSI_MOVED
    # Order statistics only: calibrating reference and site alike changes nothing.
    cal = record(ref_p, ref_y, "platt")
    ref_cal = D.score_reference(cal.apply(ref_p, "fusion"), ref_y, NAMES)
    again = D.shift(ref_cal, cal.apply(site_p[keep], "fusion"), NAMES)
    for n in NAMES:
        assert again[n]["psi"] == pytest.approx(moved[n]["psi"], abs=0.02)
        assert again[n]["ks"] == pytest.approx(moved[n]["ks"], abs=0.01)
    levels = np.array(ref["levels"])
    for t in (0.1, 0.37, 0.8):
        assert D.called_rate(ref["findings"]["a"]["quantiles"], levels, t) == pytest.approx((ref_p[:, 0] >= t).mean(), abs=0.006)


def test_site_check_reports_called_shares_on_the_calibrated_scale():
    ref_p, ref_y = scores(3000, scale=3.0, seed=8)
    cal = record(ref_p, ref_y, "platt")
    reference = {"name": "val", "images": 3000, "branches": {"fusion": D.score_reference(ref_p, ref_y, NAMES)}}
    cal_ref = cal.apply(ref_p, "fusion")
    thresholds = [0.3, 0.5, 0.7]
    site_p, site_y = scores(2000, scale=3.0, seed=9)
    out = D.site_check(reference, site_p, NAMES, thresholds=thresholds, calibration=cal, labels=site_y)
    site_cal = cal.apply(site_p, "fusion")
    for k, n in enumerate(NAMES):
        r = out["findings"][n]
        assert r["called_here"] == pytest.approx((site_cal[:, k] >= thresholds[k]).mean())
        assert r["called_reference"] == pytest.approx((cal_ref[:, k] >= thresholds[k]).mean(), abs=0.006)
        assert r["prevalence_here"] == pytest.approx(site_y[:, k].mean())
    assert out["moved"] == []


def test_calibrate_refuses_options_that_cannot_work_naming_the_fix(tmp_path):
    from agcnn.calibrate import check_arguments

    ckpt, out = tmp_path / "model.pt", tmp_path / "new.pt"
    table = tmp_path / "site.csv"
    table.write_text("path,Effusion\na.png,1\n")

    def check(**kw):
        args = dict(split="val", data=None, method="platt", sensitivity=None, specificity=None)
        args.update(kw)
        return check_arguments(ckpt, kw.pop("out", out), **{k: v for k, v in args.items() if k != "out"})

    assert check() == ("youden", None)
    assert check(split=None, data=table, sensitivity=0.9) == ("sensitivity", 0.9)
    assert check(specificity=0.95) == ("specificity", 0.95)
    for kw, message in [
        (dict(split="train"), "'train' cannot be calibrated on .training patients"),
        (dict(split=None), "give the labelled data"),
        (dict(data=table), "not both"),
        (dict(split=None, data=tmp_path / "missing.csv"), "not an existing .csv"),
        (dict(external_site=True), "--external-site is for --data TABLE.csv"),
        (dict(method="beta"), "'beta' is not known"),
        (dict(sensitivity=0.9, specificity=0.9), "not both"),
        (dict(sensitivity=90.0), "strictly between 0 and 1"),
        (dict(out=ckpt), "is the checkpoint itself"),
        (dict(out=tmp_path / "new.pth"), "name the new checkpoint with .pt"),
    ]:
        with pytest.raises(C.CalibrationError, match=message):
            check(**kw)
