"""``agcnn calibrate`` end to end on phantoms: an over-confident checkpoint, calibrated on the
validation split, is calibrated on the test split; a set it was fitted on is refused; predict
and evaluate give the same calibrated probabilities; a site whose population moved is flagged.

The checkpoint: a seeded, untrained ResNet-18 (width 8, 32 px) whose global classifier is a
logistic-regression probe of its pooled features on the training phantoms (a model that ranks
better than chance in seconds, where training one takes minutes), copied into the fusion head and with all
logits multiplied by 6 -- the over-confidence calibration must undo.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.calibrate import calibrate_checkpoint
from agcnn.calibration import CalibrationError
from agcnn.checkpoint import load_checkpoint, save_checkpoint
from agcnn.cli import main
from agcnn.evaluate import evaluate_checkpoint
from agcnn.labels import LABELS

pytestmark = pytest.mark.slow

N_PHANTOMS = 9000  # about 1350 validation and 1350 test images: ECE's sampling error well below 0.03
SCALE = 6.0
FINDINGS = ["Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory, tiny_config):
    from sklearn.linear_model import LogisticRegression

    from agcnn.data.datasets import build_datasets
    from agcnn.data.synthetic import generate_phantoms
    from agcnn.data.transforms import transforms_from_config
    from agcnn.models import AGCNN

    root = tmp_path_factory.mktemp("calib") / "phantoms"
    generate_phantoms(root, count=N_PHANTOMS, size=64, seed=0, workers=1, dicom_fraction=0.0)
    cfg = tiny_config(f"data.root={root}", f"data.synthetic_count={N_PHANTOMS}", "data.synthetic_size=64", "model.width=32")
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(cfg.labels), image_size=cfg.data.image_size).eval()
    train = build_datasets(cfg, splits=("train",))["train"]
    train.transform = transforms_from_config(cfg.data, train=False)  # the probe sees what evaluate will show
    loader = torch.utils.data.DataLoader(train, batch_size=125)
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(model(batch["image"], stage="global").global_pooled)
            labels.append(batch["labels"])
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    with torch.no_grad():
        head = model.global_branch.classifier
        head.weight.zero_()
        head.bias.fill_(-8.0)  # the nine findings phantoms never carry: called absent
        for name in FINDINGS:
            k = cfg.labels.index(name)
            probe = LogisticRegression(C=1.0, max_iter=5000).fit(x, y[:, k])
            head.weight[k] = torch.as_tensor(probe.coef_[0] * SCALE, dtype=torch.float32)
            head.bias[k] = float(probe.intercept_[0] * SCALE)
        model.init_fusion_from_global()
    ckpt = root.parent / "overconfident.pt"
    save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, stage="fusion")
    return root, ckpt


@pytest.fixture(scope="module")
def calibrated(phantoms):
    """The over-confident checkpoint calibrated on the validation split through the command line (Platt, Youden)."""
    root, ckpt = phantoms
    new = root.parent / "calibrated.pt"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--split", "val", "--out", str(new), "--device", "cpu",
                 "--bootstrap", "50", "--num-workers", "0"]) == 0
    return new


def ece(report, branch="fusion"):
    return report["branches"][branch]["ece"]["width"]["mean"]


def test_over_confident_checkpoint_is_calibrated_on_test_after_calibrating_on_validation(phantoms, calibrated, tmp_path):
    root, ckpt = phantoms
    new = calibrated
    before = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "before", device="cpu", bootstrap=50, num_workers=0)
    assert ece(before) >= 0.10, before["branches"]["fusion"]["ece"]["width"]
    assert before["calibration"] is None and (tmp_path / "before" / "reliability.png").is_file()

    summary = json.loads(new.with_suffix(".calibration").joinpath("calibration.json").read_text())
    assert summary["method"] == "platt" and summary["max_auc_change"] == 0.0
    assert summary["ece_after"]["fusion"]["width"]["mean"] < summary["ece_before"]["fusion"]["width"]["mean"]
    stored = load_checkpoint(new)
    cal = stored["calibration"]
    assert cal["data"]["name"] == "the validation split" and len(cal["id"]) == 12
    assert cal["data"]["images"] == summary["fitting_data"]["images"] > 600
    assert not any(str(root) in json.dumps(cal, default=str) for _ in [0])  # no clear paths in the record
    assert stored["operating_points_info"]["calibration"] == cal["id"] and "reference" in stored

    after = evaluate_checkpoint(new, split="test", out_dir=tmp_path / "after", device="cpu", bootstrap=50, num_workers=0)
    assert ece(after) <= 0.03, after["branches"]["fusion"]["ece"]["width"]
    assert after["calibration"]["id"] == cal["id"]
    for b in ("global", "local", "fusion"):
        assert after["branches"][b]["auc"] == before["branches"][b]["auc"], b  # identical, not close
    md = (tmp_path / "after" / "auc.md").read_text()
    assert f"platt calibration `{cal['id']}`" in md and "## Site check" in md
    # The test split is the training site's own population: nothing moved against validation.
    assert after["site_check"]["moved"] == [], after["site_check"]["findings"]
    for name in FINDINGS:
        r = after["site_check"]["findings"][name]
        assert abs(r["called_here"] - r["called_reference"]) < 0.1, (name, r)


def test_a_set_the_calibration_was_fitted_on_is_refused(phantoms, tmp_path, capsys):
    _, ckpt = phantoms
    new = tmp_path / "on_test.pt"
    calibrate_checkpoint(ckpt, new, split="test", device="cpu", bootstrap=0, num_workers=0)
    out = tmp_path / "eval"
    with pytest.raises(CalibrationError, match=r"patients of the test set are in the data the checkpoint's calibration"):
        evaluate_checkpoint(new, split="test", out_dir=out, device="cpu", bootstrap=0, num_workers=0)
    assert not out.exists()
    assert main(["evaluate", "--checkpoint", str(new), "--split", "test", "--out", str(out), "--device", "cpu",
                 "--bootstrap", "0", "--num-workers", "0"]) == 2
    assert "refusing to evaluate" in capsys.readouterr().err and not out.exists()
    # The same data with the override is scored, and every report states it.
    forced = evaluate_checkpoint(new, split="test", out_dir=out, device="cpu", bootstrap=0, num_workers=0, roc=False,
                                 allow_other_split=True)
    assert any("calibration" in p for p in forced["split"]["training_split"]["problems"])
    assert "not a held-out evaluation" in (out / "auc.md").read_text()
    # Without the calibration the checkpoint's model was never fitted on the test split.
    raw = evaluate_checkpoint(new, split="test", out_dir=tmp_path / "raw", device="cpu", bootstrap=0, num_workers=0,
                              roc=False, calibrated=False)
    assert raw["calibration"] is None and raw["calibration_skipped"] == load_checkpoint(new)["calibration"]["id"]
    with pytest.raises(CalibrationError, match="'train' cannot be calibrated on"):
        calibrate_checkpoint(ckpt, tmp_path / "x.pt", split="train", device="cpu")


def test_predict_writes_the_calibrated_probabilities_evaluate_reports(phantoms, calibrated, tmp_path):
    from agcnn.predict import predict_folder

    root, ckpt = phantoms
    new = calibrated
    table = pd.read_csv(root / "labels.csv")
    rows = table[table["split"] == "test"].head(12)
    (tmp_path / "in").mkdir()
    for p in rows["path"]:
        shutil.copy(root / p, tmp_path / "in" / p.rsplit("/", 1)[-1])
    mine = rows.assign(path=[f"in/{p.rsplit('/', 1)[-1]}" for p in rows["path"]])
    mine.to_csv(tmp_path / "table.csv", index=False)
    evaluate_checkpoint(new, split=str(tmp_path / "table.csv"), out_dir=tmp_path / "eval", device="cpu", bootstrap=0,
                        num_workers=0, roc=False)
    predict_folder(new, tmp_path / "in", tmp_path / "pred", device="cpu", progress=False, all_branches=True)
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv").sort_values("path").reset_index(drop=True)
    ev = pd.read_csv(tmp_path / "eval" / "predictions.csv").sort_values("path").reset_index(drop=True)
    assert [p.rsplit("/", 1)[-1] for p in pred["path"]] == [p.rsplit("/", 1)[-1] for p in ev["path"]]
    for branch, prefix in (("fusion", ""), ("global", "global_"), ("local", "local_")):
        np.testing.assert_allclose(pred[[f"{prefix}{n}" for n in LABELS]].to_numpy(float),
                                   ev[[f"p_{branch}_{n}" for n in LABELS]].to_numpy(float), atol=1e-5)
    cal_id = load_checkpoint(new)["calibration"]["id"]
    assert (pred["calibration"] == cal_id).all()
    manifest = json.loads((tmp_path / "pred" / "manifest.json").read_text())
    assert manifest["calibration"]["id"] == cal_id and manifest["calibration"]["data"]["name"] == "the validation split"
    # And they are not the raw probabilities.
    predict_folder(ckpt, tmp_path / "in", tmp_path / "raw", device="cpu", progress=False)
    raw = pd.read_csv(tmp_path / "raw" / "predictions.csv").sort_values("path").reset_index(drop=True)
    assert np.abs(raw[FINDINGS].to_numpy(float) - pred[FINDINGS].to_numpy(float)).max() > 0.05
    assert "calibration" not in raw.columns


def test_a_site_whose_films_look_different_is_flagged(phantoms, calibrated, tmp_path):
    import cv2

    root, _ = phantoms
    table = pd.read_csv(root / "labels.csv")
    test = table[table["split"] == "test"].head(300)
    # A "site" whose films come out of another pipeline: grey levels inverted, as a MONOCHROME1
    # film read without its photometric interpretation would be.
    (tmp_path / "site").mkdir()
    for p in test["path"]:
        img = cv2.imread(str(root / p), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(tmp_path / "site" / p.rsplit("/", 1)[-1]), (img.max() - img).astype(img.dtype))
    site = test.assign(path=[f"site/{p.rsplit('/', 1)[-1]}" for p in test["path"]])
    site.to_csv(tmp_path / "site.csv", index=False)
    report = evaluate_checkpoint(calibrated, split=str(tmp_path / "site.csv"), out_dir=tmp_path / "eval", device="cpu",
                                 bootstrap=0, num_workers=0, roc=False)
    check = report["site_check"]
    assert check["moved"], check["findings"]
    for name in check["moved"]:
        assert check["findings"][name]["psi"] >= 0.25
    md = (tmp_path / "eval" / "auc.md").read_text()
    assert "## Site check" in md and "**moved**" in md and f"The scores of {', '.join(check['moved'])} moved" in md
    # The same films as they are: the training site's own population, nothing moved.
    same = test.assign(path=[str(root / p) for p in test["path"]])
    same.to_csv(tmp_path / "same.csv", index=False)
    plain = evaluate_checkpoint(calibrated, split=str(tmp_path / "same.csv"), out_dir=tmp_path / "same", device="cpu",
                                bootstrap=0, num_workers=0, roc=False)
    assert plain["site_check"]["moved"] == [], plain["site_check"]["findings"]
    # The operating points were chosen on validation (Youden), with patient-bootstrap intervals.
    info = load_checkpoint(calibrated)["operating_points_info"]
    assert info["rule"] == "youden" and info["split"] == "the validation split"
    ci = info["intervals"]["fusion"]["Cardiomegaly"]
    assert ci["specificity_ci"][0] <= ci["specificity"] <= ci["specificity_ci"][1]
    # Calibrating at that site on its own films, declared another site's: the fitting set's report says so.
    assert main(["calibrate", "--checkpoint", str(calibrated), "--data", str(tmp_path / "site.csv"), "--external-site",
                 "--out", str(tmp_path / "site.pt"), "--device", "cpu", "--bootstrap", "0", "--num-workers", "0"]) == 0
    title = (tmp_path / "site.calibration" / "auc.md").read_text().splitlines()[0]
    assert "external site: declared (--external-site) to hold no patient of the training data" in title
