"""``agcnn evaluate`` end to end on tiny data: a phantom set and a CSV of PNGs written here."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from agcnn.checkpoint import load_checkpoint, save_checkpoint
from agcnn.cli import main
from agcnn.config import Config
from agcnn.evaluate import evaluate_checkpoint
from agcnn.labels import LABELS
from agcnn.metrics import per_class_auc

SMALL = {"image_size": 64, "resize": 64, "highres_size": 64, "num_workers": 0}


@pytest.fixture(scope="module")
def phantom_ckpt(tmp_path_factory, untrained_checkpoint):
    root = tmp_path_factory.mktemp("phantoms")
    # Under 64 images the generator stays in this process.
    data = {"dataset": "synthetic", "root": str(root / "set"), "synthetic_count": 40, "synthetic_size": 64}
    return untrained_checkpoint(root / "fusion.pt", data={**SMALL, **data}, stage="fusion")


@pytest.fixture(scope="module")
def csv_set(tmp_path_factory, untrained_checkpoint):
    """24 noise PNGs and one broken file; every label has both values, some are missing; two images a patient."""
    root = tmp_path_factory.mktemp("csvset")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    n = 24
    labels = np.zeros((n, len(LABELS)))
    labels[::2] = 1.0
    labels = np.stack([rng.permutation(labels[:, k]) for k in range(len(LABELS))], axis=1)
    labels[rng.random(labels.shape) < 0.1] = np.nan
    labels[0, :], labels[1, :] = 1.0, 0.0  # both values survive the missing ones
    rows = []
    for i in range(n):
        cv2.imwrite(str(root / "img" / f"{i}.png"), rng.integers(0, 65535, (80, 72), dtype=np.uint16))
        cells = {name: ("" if np.isnan(v) else str(int(v))) for name, v in zip(LABELS, labels[i])}
        rows.append({"path": f"img/{i}.png", "patient": f"P{i // 2}", **cells})
    (root / "img" / "broken.png").write_bytes(b"not a png")
    rows.append({**rows[0], "path": "img/broken.png", "patient": "P99"})
    table = root / "table.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    ckpt = untrained_checkpoint(root / "fusion.pt", data={**SMALL, "dataset": "csv", "root": str(root / "not-here")},
                                stage="fusion")
    return table, ckpt, labels


def test_phantom_test_split_through_the_cli(phantom_ckpt, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(phantom_ckpt), "--out", str(out), "--bootstrap", "200"])
    assert rc == 0
    for name in ("auc.csv", "auc.json", "auc.md", "roc.png", "predictions.csv"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "auc.csv")
    assert table["label"].tolist() == [*LABELS, "Mean"]
    assert [c for c in table.columns if c.endswith("_auc")] == ["global_auc", "local_auc", "fusion_auc"]
    report = json.loads((out / "auc.json").read_text())
    assert report["labels"] == list(LABELS)
    assert report["split"]["name"] == "test" and report["split"]["patient_wise"] is True
    assert len(report["checkpoint_sha256"]) == 64 and report["agcnn_version"]
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == report["n_images"] > 0
    assert [c for c in preds.columns if c.startswith("p_fusion_")] == [f"p_fusion_{n}" for n in LABELS]
    md = (out / "auc.md").read_text()
    assert "| Finding | Positives | Global | Local | Fusion |" in md and "0.868" in md and "patient-wise" in md
    assert md.split("## Calibration")[0].count("\n| ") == len(LABELS) + 2  # header, 14 findings, mean


def test_csv_file_split_numbers_and_intervals(csv_set, tmp_path):
    table, ckpt, labels = csv_set
    report = evaluate_checkpoint(ckpt, split=str(table), out_dir=tmp_path, bootstrap=300, roc=False)
    # The unreadable file is listed and left out; it does not stop the other images.
    assert report["n_images"] == len(labels) and report["n_skipped"] == 1
    skipped = pd.read_csv(tmp_path / "skipped.csv")
    assert skipped["path"].tolist() == ["img/broken.png"] and "broken.png" in skipped["reason"][0]
    assert "could not be read" in (tmp_path / "auc.md").read_text()
    assert report["bootstrap"]["unit"] == "patient" and report["split"]["patients"] == len(labels) // 2
    assert report["positives"] == {n: int(np.nansum(labels[:, k])) for k, n in enumerate(LABELS)}
    preds = pd.read_csv(tmp_path / "predictions.csv")
    # Reference labels are written back as read, missing ones as empty cells.
    np.testing.assert_array_equal(preds[list(LABELS)].to_numpy(dtype=float), labels)
    # The table's patient IDs (often hospital record numbers) are left out unless asked for.
    assert "patient" not in preds.columns and "P0" not in (tmp_path / "predictions.csv").read_text()
    evaluate_checkpoint(ckpt, split=str(table), out_dir=tmp_path / "ids", bootstrap=0, roc=False, include_identifiers=True)
    # In the one normal form every patient comparison uses (agcnn.data.tables.normalise_patient_id).
    assert pd.read_csv(tmp_path / "ids" / "predictions.csv")["patient"].tolist()[:2] == ["p0", "p0"]
    for branch in ("global", "local", "fusion"):
        r = report["branches"][branch]
        auc = np.array([r["auc"][n] for n in LABELS], dtype=float)
        # The report's AUC is the AUC of the written predictions.
        np.testing.assert_allclose(auc, per_class_auc(preds[[f"p_{branch}_{n}" for n in LABELS]].to_numpy(), labels), atol=1e-5)
        lo = np.array([r["ci_lo"][n] for n in LABELS], dtype=float)
        hi = np.array([r["ci_hi"][n] for n in LABELS], dtype=float)
        assert np.isfinite(auc).all() and np.all(lo <= auc + 1e-12) and np.all(auc <= hi + 1e-12)
        assert r["mean_ci"][0] <= r["mean_auc"] <= r["mean_ci"][1] and r["classes_in_mean"] == len(LABELS)
    auc_csv = pd.read_csv(tmp_path / "auc.csv").set_index("label")
    assert auc_csv.loc["Mean", "fusion_auc"] == pytest.approx(report["branches"]["fusion"]["mean_auc"], abs=1e-6)
    assert not (tmp_path / "roc.png").exists()


def test_global_stage_checkpoint_reports_untrained_branches(csv_set, tmp_path, untrained_checkpoint):
    table, _, _ = csv_set
    ckpt = untrained_checkpoint(tmp_path / "global.pt", data={**SMALL, "dataset": "csv", "root": "unused"}, stage="global")
    report = evaluate_checkpoint(ckpt, split=str(table), out_dir=tmp_path / "eval", bootstrap=50, roc=False)
    assert report["branches"]["global"]["trained"]
    assert report["branches"]["local"] == {"trained": False} and report["branches"]["fusion"] == {"trained": False}
    auc_csv = pd.read_csv(tmp_path / "eval" / "auc.csv")
    assert auc_csv["global_auc"].notna().all() and auc_csv["local_auc"].isna().all() and auc_csv["fusion_hi"].isna().all()
    assert "not trained" in (tmp_path / "eval" / "auc.md").read_text()
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert not any(c.startswith(("p_local_", "p_fusion_")) for c in preds.columns)


def test_val_operating_points_are_stored_and_then_scored(phantom_ckpt, tmp_path):
    ckpt = tmp_path / "copy.pt"
    ckpt.write_bytes(phantom_ckpt.read_bytes())
    report = evaluate_checkpoint(ckpt, split="val", out_dir=tmp_path / "val", bootstrap=0, roc=False,
                                 write_operating_points=True)
    stored = load_checkpoint(ckpt)
    points = stored["operating_points"]
    assert sorted(points) == ["fusion", "global", "local"]
    assert all(len(v) == len(LABELS) and all(type(t) is float for t in v) for v in points.values())
    assert points["fusion"] == pytest.approx([report["youden_operating_points"]["fusion"][n] or np.nan for n in LABELS], nan_ok=True)
    assert stored["stage"] == "fusion"  # the rest of the checkpoint is kept
    after = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "test", bootstrap=0, roc=False)
    assert after["operating_points_scored"]["branch"] == "fusion"
    assert "youden_operating_points" not in after  # never chosen on test
    # The validation scores' summary travels with the points: the test split is checked against it.
    reference = stored["reference"]["branches"]["fusion"]
    assert reference["images"] == report["n_images"] and len(reference["findings"]["Nodule"]["quantiles"]) == 201
    assert set(after["site_check"]["findings"]) == set(LABELS) and after["site_check"]["branch"] == "fusion"
    assert "site_check" not in report and "no reference score summary" in report["site_check_note"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing.pt"], "does not exist"),
        (["--checkpoint", "{tmp}/corrupt.pt"], "cannot be loaded"),
        (["--checkpoint", "{ckpt}", "--split", "tset"], "'tset' is not one of"),
        (["--checkpoint", "{ckpt}", "--split", "{tmp}/none.csv"], "does not exist"),
        (["--checkpoint", "{ckpt}", "--write-operating-points"], "needs --split val"),
        (["--checkpoint", "{ckpt}", "--num-workers", "-1"], "--num-workers must be 0"),
        (["--checkpoint", "{ckpt}", "--set", "data.val_fraction=2"], "data.val_fraction=2.0 is out of range"),
        (["--checkpoint", "{ckpt}", "--set", "model.backbone=resnet50"], "only overrides the data section"),
        (["--checkpoint", "{ckpt}", "--set", "data.image_size=224"], "fixed by the checkpoint"),
        (["--checkpoint", "{ckpt}", "--set", "data.rot=/x"], "did you mean 'root'"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args, message, phantom_ckpt, tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    argv = ["evaluate", "--out", str(tmp_path / "out"), "--bootstrap", "0", "--no-roc"]
    argv += [a.format(tmp=tmp_path, ckpt=phantom_ckpt) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- the training split

@pytest.fixture(scope="module")
def recorded_ckpt(csv_set, tmp_path_factory):
    """A checkpoint trained on a CSV table without a split column (patient-wise splits carved
    with data.split_seed), carrying the split record training writes (agcnn.data.provenance)."""
    from agcnn.data.datasets import load_dataframe
    from agcnn.data.provenance import split_record

    table_path, base, _ = csv_set
    ckpt = load_checkpoint(base)
    raw = ckpt["config"]
    raw["data"].update(metadata=str(table_path), root=str(table_path.parent), val_fraction=0.25, test_fraction=0.25)
    cfg = Config.from_dict(raw)
    table = load_dataframe(cfg)
    record = split_record(cfg.data, {s: table[table["split"] == s] for s in ("train", "val")})
    path = tmp_path_factory.mktemp("recorded") / "fusion.pt"
    save_checkpoint(path, model_state=ckpt["model"], config=cfg, stage="fusion", split=record)
    return path


def test_unchanged_split_is_checked_and_evaluates(recorded_ckpt, tmp_path):
    report = evaluate_checkpoint(recorded_ckpt, split="test", out_dir=tmp_path, bootstrap=0, roc=False)
    check = report["split"]["training_split"]
    assert check["recorded"] and check["problems"] == [] and not check["allowed_other_split"]
    assert report["split"]["patient_wise"] is True and report["split"]["patients_also_in_train"] == 0
    assert "The split matches the one the checkpoint was trained on" in (tmp_path / "auc.md").read_text()


@pytest.mark.parametrize("split, override, named", [
    ("test", "data.split_seed=1", "data.split_seed: 0 in training, 1 here"),
    ("val", "data.val_fraction=0.4", "data.val_fraction: 0.25 in training, 0.4 here"),
])
def test_another_split_is_refused_before_anything_is_written(recorded_ckpt, tmp_path, capsys, split, override, named):
    ckpt = tmp_path / "copy.pt"
    ckpt.write_bytes(recorded_ckpt.read_bytes())
    before = ckpt.read_bytes()
    out = tmp_path / "out"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--split", split, "--out", str(out), "--bootstrap", "0", "--no-roc",
            "--set", override]
    if split == "val":
        argv.append("--write-operating-points")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to evaluate" in err and named in err and "--allow-other-split" in err
    assert "split built here differs from the one the checkpoint was trained with" in err
    assert not out.exists() and ckpt.read_bytes() == before
    # Explicitly allowed: it runs, and every report says so.
    assert main([*argv, "--allow-other-split"]) == 0
    assert "--allow-other-split" in capsys.readouterr().err
    report = json.loads((out / "auc.json").read_text())
    assert report["split"]["training_split"]["allowed_other_split"] and named in report["split"]["training_split"]["problems"][0]
    assert "**Evaluated with --allow-other-split" in (out / "auc.md").read_text()
    if split == "val":
        assert load_checkpoint(ckpt)["operating_points_info"]["other_split_problems"]


def test_another_sites_table_declared_external_is_evaluated_and_says_how_far_it_was_checked(csv_set, tmp_path, monkeypatch):
    from agcnn.data.provenance import split_record
    from agcnn.evaluate import EvaluationError

    table, ckpt_path, _ = csv_set
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config.from_dict(ckpt["config"])
    key = b"the training site's key, 32 bytes"
    # Trained at another site on patients T0-T5; the table's patients are P0-P12.
    train = pd.DataFrame({"path": [f"t{i}.png" for i in range(6)], "patient": [f"T{i}" for i in range(6)]})
    record = split_record(cfg.data, {"train": train, "val": pd.DataFrame({"path": ["v.png"], "patient": ["T9"]})}, key=key)
    path = tmp_path / "trained.pt"
    save_checkpoint(path, model_state=ckpt["model"], config=cfg, stage="fusion", split=record)
    monkeypatch.delenv("AGCNN_SITE_KEY", raising=False)
    monkeypatch.delenv("AGCNN_SITE_KEY_FILE", raising=False)
    # This site has no key: the overlap cannot be checked, and undeclared that is refused.
    with pytest.raises(EvaluationError, match="cannot be checked"):
        evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "refused", bootstrap=0, roc=False)
    report = evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "ext", bootstrap=0, roc=False,
                                 external_site=True)
    said = "external site: declared (--external-site) to hold no patient of the training data; not checked"
    assert said in report["split"]["caveats"] and report["split"]["training_split"]["problems"] == []
    assert report["split"]["patients_also_in_train"] is None
    assert said in (tmp_path / "ext" / "auc.md").read_text().splitlines()[0]
    assert "External site: declared (--external-site)" in (tmp_path / "ext" / "report.html").read_text()
    # Where the overlap can be counted it is, and a declaration does not overrule it.
    monkeypatch.setenv("AGCNN_SITE_KEY", key.decode())
    report = evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "keyed", bootstrap=0, roc=False,
                                 external_site=True, html=False)
    assert report["split"]["caveats"][-1].endswith("; checked: none shared")
    shared = tmp_path / "shared.csv"
    rows = pd.read_csv(table, dtype=str)
    rows.loc[:1, "patient"] = "T3"
    rows.to_csv(shared, index=False)
    (tmp_path / "img").symlink_to(table.parent / "img")
    with pytest.raises(EvaluationError, match=r"1 of the 13 patients .* \(although --external-site declares them"):
        evaluate_checkpoint(path, split=str(shared), out_dir=tmp_path / "refused", bootstrap=0, roc=False,
                            external_site=True)
    # The checkpoint's own splits are checked against its record, never declared away.
    with pytest.raises(EvaluationError, match="--external-site is for a table of another site's films"):
        evaluate_checkpoint(path, split="test", out_dir=tmp_path / "refused", external_site=True)
    assert not (tmp_path / "refused").exists()


def test_a_table_holding_training_patients_is_refused(csv_set, tmp_path, monkeypatch):
    from agcnn.data.provenance import split_record
    from agcnn.evaluate import EvaluationError

    table, ckpt_path, _ = csv_set
    rows = pd.read_csv(table, dtype=str)
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config.from_dict(ckpt["config"])
    key = b"a site key of 32 bytes, not in the file"
    # Trained on patients P0-P2 (the first six rows of the table, spelled in another case and with a
    # space, as another export might), validated on P50.
    train = rows.iloc[:6].assign(patient=rows["patient"].iloc[:6].str.replace("P", " p"))
    record = split_record(cfg.data, {"train": train, "val": pd.DataFrame({"path": ["x.png"], "patient": ["P50"]})}, key=key)
    path = tmp_path / "trained.pt"
    save_checkpoint(path, model_state=ckpt["model"], config=cfg, stage="fusion", split=record)
    # Without the site key the hashes cannot be tested, so the overlap cannot be ruled out: refused too.
    monkeypatch.delenv("AGCNN_SITE_KEY", raising=False)
    monkeypatch.delenv("AGCNN_SITE_KEY_FILE", raising=False)
    with pytest.raises(EvaluationError, match=r"cannot be checked.*need the site key it was trained with"):
        evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "refused", bootstrap=0, roc=False)
    monkeypatch.setenv("AGCNN_SITE_KEY", key.decode())
    with pytest.raises(EvaluationError, match=r"3 of the 13 patients of the table.csv set have images the checkpoint was trained on"):
        evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "refused", bootstrap=0, roc=False)
    assert not (tmp_path / "refused").exists()
    report = evaluate_checkpoint(path, split=str(table), out_dir=tmp_path / "allowed", bootstrap=0, roc=False,
                                 allow_other_split=True)
    assert report["split"]["patient_wise"] is False and report["split"]["patients_also_in_train"] == 3
    assert report["split"]["patient_wise"] is False and report["split"]["patients_also_in_train"] == 3
