"""agcnn localize: box tables, the coordinate mapping through the evaluation transform, scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agcnn.checkpoint import save_checkpoint
from agcnn.cli import main
from agcnn.config import Config
from agcnn.data.geometry import Geometry
from agcnn.data.transforms import transforms_from_config
from agcnn.errors import UsageError
from agcnn.labels import LABELS
from agcnn.data.boxes import LocalizationError, read_box_table
from agcnn.localize import (
    bootstrap_share,
    clip_box,
    overlaps,
    score_boxes,
    summarise,
)
from agcnn.models import AGCNN

# CI clones the repository next to shared/; never an absolute path.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NIH_SAMPLE = SHARED / "data" / "nih-cxr14-sample"
NIH_BOXES = SHARED / "data" / "nih-metadata" / "BBox_List_2017.csv.gz"


# ---------------------------------------------------------------------- geometry (golden values)

@pytest.mark.parametrize(
    "geometry,hw,box,expected",
    [
        # Paper mode: 1024 -> 256, centre crop 224 at offset 16.
        (Geometry(256, 224, 224), (1024, 1024), (64, 64, 1024, 1024), (0, 0, 240, 240)),
        (Geometry(256, 224, 224), (1024, 1024), (512, 256, 612, 356), (112, 48, 137, 73)),
        # No crop: resize straight to the model's size.
        (Geometry(224, 224, 224), (1024, 1024), (512, 256, 612, 356), (112, 56, 133.875, 77.875)),
        # Non-square original: x and y scale differently (the resize ignores the aspect ratio).
        (Geometry(256, 224, 224), (1000, 2000), (1000, 250, 1500, 375), (112, 48, 176, 80)),
        # The demo: local branch crops from a 256 px copy, the global branch sees 128 px.
        (Geometry(128, 128, 256), (256, 256), (64, 32, 192, 96), (32, 16, 96, 48)),
        # Paper mode with a high-resolution copy: resize 512, crop 448, model at 224.
        (Geometry(256, 224, 448), (1024, 1024), (64, 64, 1024, 1024), (0, 0, 240, 240)),
    ],
)
def test_box_to_input_golden(geometry, hw, box, expected):
    h, w = hw
    assert geometry.to_input(box, height=h, width=w) == pytest.approx(expected)


def test_box_to_input_inverts_predicts_mapping_back_to_the_original():
    g = Geometry(256, 224, 224)
    back = g.to_original([40, 60, 120, 200], height=1024, width=1024)
    assert g.to_input(back, height=1024, width=1024) == pytest.approx((40, 60, 120, 200))


@pytest.mark.parametrize("resize,image_size,highres", [(256, 224, 224), (80, 64, 64), (64, 64, 128), (300, 224, 224)])
def test_box_lands_where_the_transform_puts_the_pixels(resize, image_size, highres):
    # Draw a box into an image, run the real evaluation transform, and find it in the model's view.
    h, w = 300, 420
    box = (130, 90, 330, 210)
    img = np.zeros((h, w), np.float32)
    img[box[1]:box[3], box[0]:box[2]] = 1.0
    cfg = Config.from_dict({"data": {"resize": resize, "image_size": image_size, "highres_size": highres}})
    x = transforms_from_config(cfg.data, train=False)(torch.from_numpy(img)[None])
    view = F.interpolate(x[None, :1], size=(image_size, image_size), mode="area")[0, 0] if highres != image_size else x[0]
    on = (view * 0.229 + 0.485) > 0.5
    ys, xs = torch.nonzero(on, as_tuple=True)
    found = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    mapped = Geometry(resize, image_size, highres).to_input(box, height=h, width=w)
    clipped, _ = clip_box(mapped, image_size)
    assert found == pytest.approx(clipped, abs=1.0)


def test_clip_box_counts_what_is_left():
    assert clip_box((-10, -10, -1, 5), 100) == ((0, 0, 0, 5), 0.0)
    box, kept = clip_box((-10, 0, 10, 10), 100)
    assert box == (0, 0, 10, 10) and kept == pytest.approx(0.5)
    assert clip_box((1, 2, 3, 4), 100) == ((1, 2, 3, 4), 1.0)


def test_overlaps_golden():
    gt = np.array([[10, 10, 20, 20]] * 4)
    pred = np.array([[10, 10, 20, 20], [30, 30, 40, 40], [0, 0, 100, 100], [15, 10, 25, 20]])
    s = overlaps(gt, pred)
    np.testing.assert_allclose(s["iou"], [1, 0, 0.01, 50 / 150])
    # IoBB is the intersection over the *predicted* box (Wang et al. 2017).
    np.testing.assert_allclose(s["iobb"], [1, 0, 0.01, 0.5])
    np.testing.assert_array_equal(s["centre"], [1, 0, 1, 1])


def test_bootstrap_share_interval_contains_the_mean_and_is_reproducible():
    hits = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], float)
    a = bootstrap_share(hits, 500, np.random.default_rng(0))
    b = bootstrap_share(hits, 500, np.random.default_rng(0))
    assert a == b and a[1] <= a[0] == 0.7 <= a[2] and a[2] - a[1] > 0.2
    assert math.isnan(bootstrap_share(hits, 0, np.random.default_rng(0))[1])
    assert math.isnan(bootstrap_share(np.array([]), 10, np.random.default_rng(0))[0])


# ---------------------------------------------------------------------- box tables

def test_reads_the_nih_table_with_its_spelling_and_1024_space(tmp_path):
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Infiltrate,100.5,200,50,60\n"
        "b.png,Mass,1,2,3,4\n"
        "c.png,Fracture,1,2,3,4\n"
    )
    t = read_box_table(p, LABELS)
    assert t["label"].tolist() == ["Infiltration", "Mass"]
    assert t.iloc[0][["x0", "y0", "x1", "y1"]].tolist() == [100.5, 200, 150.5, 260]
    assert (t["space_w"] == 1024).all() and (t["space_h"] == 1024).all()
    assert (read_box_table(p, LABELS, "2500x2048")[["space_w", "space_h"]].iloc[0] == [2500, 2048]).all()


def test_reads_the_phantom_table_in_image_pixels(tmp_path):
    p = tmp_path / "boxes.csv"
    pd.DataFrame({"path": ["images/a.png"], "label": ["Nodule"], "x0": [3], "y0": [4], "x1": [9], "y1": [10]}).to_csv(p, index=False)
    t = read_box_table(p, LABELS)
    assert t.iloc[0][["path", "label", "x0", "y1", "space_w"]].tolist() == ["images/a.png", "Nodule", 3.0, 10.0, 0.0]


@pytest.mark.parametrize(
    "text,match",
    [
        ("a,b,c\n1,2,3\n", "neither the NIH header"),
        ("path,label,x0,y0,x1,y1\na.png,Mass,5,5,5,9\n", "empty box"),
        ("path,label,x0,y0,x1,y1\na.png,Mass,5,x,9,9\n", "missing or empty"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(tmp_path, text, match):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(LocalizationError, match=match):
        read_box_table(p, LABELS)


def test_bad_box_space_and_missing_table(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("path,label,x0,y0,x1,y1\na.png,Mass,1,1,9,9\n")
    with pytest.raises(UsageError, match="WxH"):
        read_box_table(p, LABELS, "big")
    with pytest.raises(LocalizationError, match="does not exist"):
        read_box_table(tmp_path / "none.csv", LABELS)


# ---------------------------------------------------------------------- planted boxes

class Brightness(nn.Module):
    """A 'backbone' whose every channel is the image brightness averaged over stride-8 cells:
    its CAM, attention heatmap and crop all fall on the bright box by construction."""

    num_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :1] * 0.229 + 0.485).clamp(0, 1)
        return F.avg_pool2d(bright, 8).expand(-1, self.num_features, -1, -1).contiguous()


def planted_model(cfg: Config) -> AGCNN:
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=cfg.data.image_size)
    model.global_branch.features = Brightness()
    model.local_branch.features = Brightness()
    with torch.no_grad():
        for lin in (model.global_branch.classifier, model.local_branch.classifier, model.fusion):
            lin.weight.fill_(1.0 / lin.in_features)
            lin.bias.zero_()
    return model.eval()


def planted_set(tmp_path: Path) -> tuple[Path, list[tuple[str, tuple[int, int, int, int]]]]:
    # 128 px originals, a white box on black; the model sees them at 64 px (resize only), so the
    # boxes fall on the 8 px feature grid: (32, 48, 80, 96) -> (16, 24, 40, 48).
    root = tmp_path / "planted"
    (root / "images").mkdir(parents=True)
    planted = [("images/p0.png", (32, 48, 80, 96)), ("images/p1.png", (16, 16, 64, 48)), ("images/p2.png", (64, 32, 112, 112))]
    for rel, (x0, y0, x1, y1) in planted:
        img = np.zeros((128, 128), np.uint8)
        img[y0:y1, x0:x1] = 255
        cv2.imwrite(str(root / rel), img)
    return root, planted


def planted_cfg() -> Config:
    return Config.from_dict({
        "model": {"backbone": "resnet18", "pool": "avg", "threshold": 0.5, "local_size": 64},
        "data": {"resize": 64, "image_size": 64, "highres_size": 64},
    })


def test_a_cam_forced_onto_the_box_scores_one_and_a_shifted_box_zero(tmp_path):
    root, planted = planted_set(tmp_path)
    cfg = planted_cfg()
    model = planted_model(cfg)
    labels = ["Mass", "Nodule", "Cardiomegaly"]
    hit = pd.DataFrame([(rel, lab, *box) for (rel, box), lab in zip(planted, labels)],
                       columns=["path", "label", "x0", "y0", "x1", "y1"]).assign(space_w=0.0, space_h=0.0)
    scores, counts = score_boxes(model, cfg, hit, root)
    assert len(scores) == 3 * 4 and not counts["missing_images"] and not counts["out_of_view"]
    assert (scores["iou"] == 1.0).all() and (scores["iobb"] == 1.0).all() and scores["centre_in_box"].all()
    assert not scores["empty_map"].any()
    summary = summarise(scores, n_boot=50)
    assert (summary["value"] == 1.0).all()

    # The same boxes shifted onto the other half of the image: no overlap at all.
    shifted = hit.copy()
    shifted["x0"], shifted["x1"] = (shifted["x0"] + 64) % 128, (shifted["x0"] + 64) % 128 + (shifted["x1"] - shifted["x0"])
    shifted.loc[shifted["x1"] > 128, ["x0", "x1"]] = [[0, 16]]
    scores, _ = score_boxes(model, cfg, shifted.assign(y0=0, y1=16), root)
    assert (scores["iou"] == 0.0).all() and (scores["iobb"] == 0.0).all() and not scores["centre_in_box"].any()
    summary = summarise(scores, n_boot=50)
    assert (summary["value"] == 0.0).all()


def test_boxes_outside_the_field_of_view_are_counted_not_dropped(tmp_path):
    root, planted = planted_set(tmp_path)
    # Paper-like crop: 128 px -> resize 80 -> centre crop 64 (offset 8 = 12.8 original pixels).
    cfg = Config.from_dict({
        "model": {"backbone": "resnet18", "pool": "avg", "threshold": 0.5, "local_size": 64},
        "data": {"resize": 80, "image_size": 64, "highres_size": 64},
    })
    model = planted_model(cfg)
    table = pd.DataFrame(
        [("images/p0.png", "Mass", 0, 0, 10, 10), ("images/p0.png", "Nodule", 5, 30, 40, 60), ("missing.png", "Mass", 1, 1, 5, 5)],
        columns=["path", "label", "x0", "y0", "x1", "y1"],
    ).assign(space_w=0.0, space_h=0.0)
    scores, counts = score_boxes(model, cfg, table, root)
    assert counts["out_of_view"] == {"Mass": 1}
    assert counts["clipped"] == {"Nodule": 1}
    assert counts["missing_images"] == ["missing.png"]
    assert set(scores["label"]) == {"Nodule"} and (scores["visible_share"] < 1).all()


# ---------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = Config.from_dict({
        "model": {"backbone": "resnet18", "local_size": 64, "pool": "avg"},
        "data": {"resize": 72, "image_size": 64, "highres_size": 64},
    })
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model_state=model.state_dict(), config=cfg, stage="fusion")
    return path


def test_localize_command_on_phantoms_writes_the_report(tmp_path, checkpoint, capsys):
    from agcnn.data.synthetic import generate_phantoms

    root = tmp_path / "ph"
    generate_phantoms(root, count=6, size=96, seed=1, workers=1)
    assert (root / "boxes.csv").is_file(), "the phantom generator must write boxes.csv (agcnn localize reads it)"
    out = tmp_path / "loc"
    rc = main(["localize", "--checkpoint", str(checkpoint), "--boxes", str(root / "boxes.csv"), "--images", str(root),
               "--out", str(out), "--bootstrap", "20", "--device", "cpu", "--cases", "2"])
    assert rc == 0
    n_boxes = len(pd.read_csv(root / "boxes.csv"))
    report = json.loads((out / "localization.json").read_text())
    assert report["counts"]["boxes"] == n_boxes and report["settings"]["methods"] == ["attended", "global_cam", "local_cam", "fusion_cam"]
    summary = pd.read_csv(out / "localization.csv")
    assert set(summary["metric"]) == {"iou", "iobb", "centre_in_box"}
    assert sorted(summary["threshold"].dropna().unique()) == [0.1, 0.25, 0.5, 0.75]
    assert ((summary["value"] >= 0) & (summary["value"] <= 1)).all()
    md = (out / "localization.md").read_text()
    assert "T(IoBB)=0.5 Acc." in md and "Wang et al. 2017" in md and "0.88" in md
    assert len(pd.read_csv(out / "localization_boxes.csv")) == 4 * n_boxes
    assert (out / "localization_cases.png").stat().st_size > 1000
    assert "report in" in capsys.readouterr().out


def test_localize_command_errors_name_the_fix(tmp_path, checkpoint, capsys):
    table = tmp_path / "b.csv"
    table.write_text("path,label,x0,y0,x1,y1\nnope.png,Mass,1,1,9,9\n")
    rc = main(["localize", "--checkpoint", str(checkpoint), "--boxes", str(table), "--images", str(tmp_path),
               "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2 and "--images" in capsys.readouterr().err
    rc = main(["localize", "--checkpoint", str(checkpoint), "--boxes", str(table), "--images", str(tmp_path),
               "--out", str(tmp_path / "o"), "--cam-threshold", "1.5"])
    assert rc == 2 and "cam-threshold" in capsys.readouterr().err


@pytest.mark.skipif(not (NIH_SAMPLE / "labels.csv").is_file() or not NIH_BOXES.is_file(),
                    reason=f"NIH sample images or BBox_List_2017 not found under {SHARED} (shared/ beside the clone)")
def test_localize_on_the_real_boxed_nih_images(tmp_path):
    from agcnn.localize import localize_checkpoint

    # The paper's geometry: 1024 px boxes on the 512 px sample images, resize 256, centre crop 224.
    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 224}, "data": {"resize": 256, "image_size": 224}})
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=224)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, stage="fusion")
    report = localize_checkpoint(ckpt, NIH_BOXES, NIH_SAMPLE / "images", tmp_path / "out", bootstrap=50, device="cpu", cases=2)
    c = report["counts"]
    found = c["images"] - len(c["missing_images"])
    assert found == 12, f"expected the 12 boxed sample images, found {found}"
    boxes = pd.read_csv(tmp_path / "out" / "localization_boxes.csv")
    assert boxes["path"].nunique() + sum(c["out_of_view"].values()) >= 12
    # 00001369_000.png, Cardiomegaly at (337, 276, 554 x 387) in 1024 px -> resize 256 -> crop 224 at 16.
    row = boxes[(boxes["path"] == "00001369_000.png") & (boxes["method"] == "attended")].iloc[0]
    assert [row["gt_x0"], row["gt_y0"]] == pytest.approx([337.0 / 4 - 16, 276.317 / 4 - 16], abs=0.01)
    assert row["gt_x1"] == pytest.approx(min(224.0, (337.0 + 553.72) / 4 - 16), abs=0.01)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_report_says_a_max_pooling_cam_is_approximate(pool):
    import pandas as pd

    from agcnn.localize import markdown_report

    counts = {"boxes": 0, "images": 0, "missing_images": [], "unreadable_images": [], "out_of_view": {}, "clipped": {}}
    settings = {"checkpoint": "c.pt", "boxes": "b.csv", "explain": "cam", "cam_threshold": 0.5,
                "attention_threshold": 0.7, "bootstrap": 0, "pool": pool}
    text = markdown_report(pd.DataFrame(), counts, settings)
    assert ("not how the logit was formed" in text) == (pool == "max")
