"""Which pixels a model sees: evaluate and predict agree on the decoded originals, and a report
says when the ``agcnn prepare`` cache was read instead (its squares give other probabilities)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from agcnn.checkpoint import load_checkpoint
from agcnn.data.cache import build_cache
from agcnn.evaluate import evaluate_checkpoint
from agcnn.labels import LABELS
from agcnn.predict import predict_folder

SMALL = {"image_size": 64, "resize": 72, "highres_size": 64, "num_workers": 0}


@pytest.fixture(scope="module")
def table_set(tmp_path_factory, untrained_checkpoint):
    """16 PNGs of another size than the model's (8 val, 8 test), a labels.csv, a fusion checkpoint."""
    root = tmp_path_factory.mktemp("pixels")
    (root / "img").mkdir()
    rng = np.random.default_rng(1)
    rows = []
    yy, xx = np.mgrid[0:90, 0:70]
    for i in range(16):
        img = (40 * np.sin(xx / (3 + i)) + 30 * np.cos(yy / 5) + rng.normal(0, 25, xx.shape) + 128).clip(0, 255)
        cv2.imwrite(str(root / "img" / f"{i}.png"), img.astype(np.uint8))
        cells = {name: str((i + k) % 2) for k, name in enumerate(LABELS)}
        rows.append({"path": f"img/{i}.png", "patient": f"P{i}", "split": "val" if i < 8 else "test", **cells})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    ckpt = untrained_checkpoint(root / "fusion.pt", data={**SMALL, "dataset": "csv", "root": str(root), "cache_size": 48},
                                stage="fusion", seed=2)
    return root, ckpt


def _predicted(root, ckpt, out):
    predict_folder(ckpt, root / "img", out, device="cpu", batch_size=3, workers=0, progress=False)
    preds = pd.read_csv(out / "predictions.csv").set_index("path")
    return preds, json.loads((out / "manifest.json").read_text())


def test_evaluate_and_predict_give_the_same_probabilities_on_the_decoded_originals(table_set, tmp_path):
    root, ckpt = table_set
    report = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "eval", bootstrap=0, roc=False, batch_size=5)
    assert report["pixels"] == {"source": "original"}
    assert "the decoded originals, as `agcnn predict` reads them" in (tmp_path / "eval" / "auc.md").read_text()
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("path")
    preds, manifest = _predicted(root, ckpt, tmp_path / "pred")
    assert manifest["pixels"] == {"source": "original"}
    for rel in evaluated.index:
        mine = preds.loc[rel.removeprefix("img/"), list(LABELS)].to_numpy(float)
        theirs = evaluated.loc[rel, [f"p_fusion_{n}" for n in LABELS]].to_numpy(float)
        # predictions.csv of evaluate holds 6 decimals.
        np.testing.assert_allclose(mine, theirs, atol=1e-6, err_msg=rel)


def test_a_report_on_the_prepare_cache_says_so_and_the_operating_points_carry_it(table_set, tmp_path):
    root, original = table_set
    ckpt = tmp_path / "fusion.pt"
    shutil.copyfile(original, ckpt)
    paths = pd.read_csv(root / "labels.csv")["path"].tolist()
    build_cache(tmp_path / "cache", paths, root, size=48, workers=0)
    cached = [f"data.cache={tmp_path / 'cache'}"]
    report = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "eval", bootstrap=0, roc=False, data_overrides=cached)
    assert report["pixels"]["source"] == "prepare_cache" and report["pixels"]["size"] == 48
    assert "the `agcnn prepare` cache (48 px uint8 squares)" in (tmp_path / "eval" / "auc.md").read_text()
    # The cache's squares are other pixels: the probabilities move, which is why the report says so.
    plain = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "plain", bootstrap=0, roc=False)
    a = pd.read_csv(tmp_path / "eval" / "predictions.csv").filter(like="p_fusion_").to_numpy()
    b = pd.read_csv(tmp_path / "plain" / "predictions.csv").filter(like="p_fusion_").to_numpy()
    assert plain["pixels"] == {"source": "original"} and np.abs(a - b).max() > 1e-4

    # Operating points chosen on the cache carry that; predict (on the originals) records both.
    evaluate_checkpoint(ckpt, split="val", out_dir=tmp_path / "val", bootstrap=0, roc=False, data_overrides=cached,
                        write_operating_points=True)
    info = load_checkpoint(ckpt)["operating_points_info"]
    assert info["pixels"]["source"] == "prepare_cache"
    _, manifest = _predicted(root, ckpt, tmp_path / "pred")
    assert manifest["pixels"] == {"source": "original"}
    assert manifest["operating_points_pixels"]["source"] == "prepare_cache"
    test = evaluate_checkpoint(ckpt, split="test", out_dir=tmp_path / "test", bootstrap=0, roc=False)
    assert test["operating_points_pixels"]["source"] == "prepare_cache"
    assert "operating points were chosen on the `agcnn prepare` cache" in (tmp_path / "test" / "auc.md").read_text()
