"""Run folders the report pages are built from, made by the real commands on tiny data.

* ``phantom_checkpoint`` -- an untrained 64 px checkpoint over a 40-phantom set, with fusion
  operating points (so predict makes calls and evaluate scores sensitivity / specificity).
* ``evaluate_dir`` -- ``agcnn evaluate`` of it on the phantoms' test split (``report.html`` not
  yet written).
* ``predict_dir`` -- ``agcnn predict --overlays`` over three chest DICOM files, one skull film
  (out of scope), one HTML page saved as ``.dcm`` and one file whose name holds markup.
* ``localize_dir`` -- ``agcnn localize`` against the phantoms' boxes (which writes its page too).
* ``demo_dir`` -- a folder laid out as ``agcnn demo`` leaves it (evaluation/, predictions/, run/).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from markup import MARKUP_NAME

SMALL = {"image_size": 64, "resize": 64, "highres_size": 64, "num_workers": 0}


@pytest.fixture(scope="session")
def phantom_checkpoint(tmp_path_factory, untrained_checkpoint) -> Path:
    from agcnn.data.synthetic import ensure_phantoms

    root = tmp_path_factory.mktemp("pages-phantoms")
    data = {"dataset": "synthetic", "root": str(root / "set"), "synthetic_count": 40, "synthetic_size": 64}
    ensure_phantoms(data["root"], count=40, size=64, seed=0)
    thresholds = [0.5] * 14
    return untrained_checkpoint(root / "fusion.pt", data={**SMALL, **data}, stage="fusion",
                                operating_points={"fusion": thresholds, "global": thresholds, "local": thresholds},
                                operating_points_info={"rule": "youden", "split": "val", "n_images": 4})


@pytest.fixture(scope="session")
def evaluate_dir(phantom_checkpoint, tmp_path_factory) -> Path:
    from agcnn.evaluate import evaluate_checkpoint

    out = tmp_path_factory.mktemp("pages-evaluate")
    torch.set_num_threads(1)
    evaluate_checkpoint(phantom_checkpoint, split="test", out_dir=out, device="cpu", num_workers=0, bootstrap=20,
                        html=False)
    return out


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) / (2 * (0.15 * h) ** 2))
    return (blob * 3000 + rng.integers(0, 800, (h, w))).astype(np.uint16)


@pytest.fixture(scope="session")
def predict_dir(phantom_checkpoint, tmp_path_factory) -> Path:
    from agcnn.data.dicom_write import write_dicom
    from agcnn.predict import predict_folder

    base = tmp_path_factory.mktemp("pages-predict")
    inp = base / "input"
    inp.mkdir()
    for i in range(3):
        write_dicom(inp / f"chest_{i}.dcm", _image(80, 72, i), ViewPosition="PA")
    write_dicom(inp / MARKUP_NAME, _image(64, 64, 7), ViewPosition="PA")
    write_dicom(inp / "skull.dcm", _image(64, 64, 5), BodyPartExamined="SKULL")
    (inp / "page.dcm").write_text("<!DOCTYPE html><html><body>Session expired</body></html>")
    torch.set_num_threads(1)
    predict_folder(phantom_checkpoint, inp, base / "out", device="cpu", workers=0, batch_size=4, overlays=True,
                   progress=False)
    return base / "out"


@pytest.fixture(scope="session")
def localize_dir(phantom_checkpoint, tmp_path_factory) -> Path:
    from agcnn.checkpoint import load_checkpoint
    from agcnn.localize import localize_checkpoint

    root = Path(load_checkpoint(phantom_checkpoint)["config"]["data"]["root"])
    out = tmp_path_factory.mktemp("pages-localize")
    localize_checkpoint(phantom_checkpoint, root / "boxes.csv", root, out, bootstrap=20, device="cpu", cases=2)
    return out


@pytest.fixture(scope="session")
def demo_dir(evaluate_dir, predict_dir, phantom_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pages-demo")
    shutil.copytree(evaluate_dir, out / "evaluation")
    shutil.copytree(predict_dir, out / "predictions")
    (out / "run" / "fusion").mkdir(parents=True)
    return out
