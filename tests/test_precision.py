"""One inference precision: training validation, evaluate and predict score a checkpoint alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agcnn.checkpoint import load_checkpoint
from agcnn.config import Config
from agcnn.evaluate import evaluate_checkpoint
from agcnn.labels import LABELS
from agcnn.precision import inference_precision
from agcnn.train.loop import train

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=36", "data.highres_size=48",
    "data.num_workers=0", "data.synthetic_count=40", "data.synthetic_size=64", "data.augment=paper",
    "train.device=cpu", "train.channels_last=false", "train.global.batch_size=8", "train.local.batch_size=8",
    "train.fusion.batch_size=8", "train.global.epochs=2", "train.local.epochs=1", "train.fusion.epochs=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp32_switches_off_an_enclosing_autocast_and_bf16_turns_it_on():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with inference_precision("fp32", "cpu"):
            assert lin(x).dtype == torch.float32
    with inference_precision("bf16", "cpu"):
        assert lin(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"train.inference_precision 'fp16'.*valid: fp32, bf16"):
        with inference_precision("fp16", "cpu"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_val_reproduces_the_auc_training_logged(tmp_path, precision):
    """``evaluate --split val`` on each stage's best.pt gives the validation AUC and operating
    points that training recorded for it, to 1e-6: same data, transform and precision."""
    cfg = Config.load(None, [*TINY, f"data.root={tmp_path / 'phantoms'}", f"train.inference_precision={precision}",
                             *(["model.no_finding=true", "train.cache_fusion_features=false"] if precision == "bf16" else [])])
    torch.manual_seed(0)
    train(cfg, tmp_path / "run", progress=False, say=lambda _m: None)
    for stage in ("global", "local", "fusion"):
        path = tmp_path / "run" / stage / "best.pt"
        ckpt = load_checkpoint(path)
        report = evaluate_checkpoint(path, split="val", out_dir=tmp_path / f"eval_{stage}", device="cpu", bootstrap=0,
                                     roc=False, num_workers=0)
        assert report["inference_precision"] == precision
        assert report["branches"][stage]["mean_auc"] == pytest.approx(ckpt["metric"], abs=1e-6), stage
        for branch, logged in ckpt["val_auc"].items():
            got = [report["branches"][branch]["auc"][n] for n in LABELS]
            np.testing.assert_allclose(np.array(got, dtype=float), np.array(logged, dtype=float), atol=1e-6)
            youden = [report["youden_operating_points"][branch][n] for n in LABELS]
            np.testing.assert_allclose(np.array(youden, dtype=float), np.array(ckpt["operating_points"][branch], dtype=float),
                                       atol=1e-6)
        assert json.loads((tmp_path / f"eval_{stage}" / "auc.json").read_text())["inference_precision"] == precision


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predictions_do_not_depend_on_the_device(tmp_path, precision):
    """One checkpoint, one folder, predicted on the CPU and on CUDA: the same calls, and
    probabilities equal up to summation order (fp32) or bf16 rounding."""
    import cv2
    import pandas as pd

    from agcnn.checkpoint import save_checkpoint
    from agcnn.models import AGCNN
    from agcnn.predict import predict_folder

    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64},
                            "data": {"image_size": 64, "highres_size": 96, "resize": 72},
                            "train": {"inference_precision": precision}})
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, stage="fusion",
                    operating_points={"fusion": [0.5] * len(LABELS)})
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(12):
        yy, xx = np.mgrid[0:120, 0:100]
        blob = np.exp(-((yy - rng.uniform(20, 100)) ** 2 + (xx - rng.uniform(20, 80)) ** 2) / 300.0)
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), (blob * 200 + rng.integers(0, 50, (120, 100))).astype(np.uint8))
    tables = {}
    for dev in ("cpu", "cuda"):
        predict_folder(ckpt, tmp_path / "in", tmp_path / dev, device=dev, batch_size=4, all_branches=True, progress=False)
        tables[dev] = pd.read_csv(tmp_path / dev / "predictions.csv").sort_values("path").reset_index(drop=True)
        manifest = json.loads((tmp_path / dev / "manifest.json").read_text())
        assert manifest["inference_precision"] == precision
    cpu, gpu = tables["cpu"], tables["cuda"]
    probs = [c for c in cpu.columns if c in LABELS or c.startswith(("global_", "local_"))]
    tol = 1e-4 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(gpu[probs].to_numpy(float), cpu[probs].to_numpy(float), atol=tol)
    if precision == "fp32":
        calls = [c for c in cpu.columns if c.startswith("call_")]
        assert (gpu[calls].to_numpy() == cpu[calls].to_numpy()).all()
        boxes = [c for c in cpu.columns if c.startswith("box_")]
        np.testing.assert_allclose(gpu[boxes].to_numpy(float), cpu[boxes].to_numpy(float), atol=1.0)


@pytest.mark.slow
def test_predict_and_evaluate_score_at_the_checkpoints_precision(tmp_path):
    """The same images through ``predict`` and ``evaluate``: the same probabilities at the stored
    precision, and bf16 visibly different from fp32 (so both really apply it)."""
    import cv2
    import pandas as pd

    from agcnn.checkpoint import save_checkpoint
    from agcnn.models import AGCNN
    from agcnn.predict import predict_folder

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(6):
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), rng.integers(0, 255, (90, 80), dtype=np.uint8))
    rows = [{"path": f"in/{i}.png", "patient": f"P{i}", **{n: i % 2 for n in LABELS}} for i in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    fusion = {}
    for precision in ("fp32", "bf16"):
        cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64},
                                "data": {"image_size": 64, "highres_size": 64, "resize": 72, "num_workers": 0},
                                "train": {"inference_precision": precision, "channels_last": True}})
        torch.manual_seed(0)
        model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64)
        ckpt = tmp_path / f"{precision}.pt"
        save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, stage="fusion")
        predict_folder(ckpt, tmp_path / "in", tmp_path / f"pred_{precision}", device="cpu", progress=False)
        evaluate_checkpoint(ckpt, split=str(tmp_path / "table.csv"), out_dir=tmp_path / f"eval_{precision}", device="cpu",
                            bootstrap=0, roc=False, num_workers=0)
        pred = pd.read_csv(tmp_path / f"pred_{precision}" / "predictions.csv").sort_values("path")
        ev = pd.read_csv(tmp_path / f"eval_{precision}" / "predictions.csv").sort_values("path")
        assert [p.split("/")[-1] for p in ev["path"]] == [p.split("/")[-1] for p in pred["path"]]
        a, b = pred[list(LABELS)].to_numpy(float), ev[[f"p_fusion_{n}" for n in LABELS]].to_numpy(float)
        np.testing.assert_allclose(a, b, atol=1e-5)
        fusion[precision] = a
    assert np.abs(fusion["bf16"] - fusion["fp32"]).max() > 1e-4
