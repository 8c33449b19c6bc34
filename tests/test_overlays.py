"""Overlay pictures: which findings are explained, shared colour scale, visible empty states, predict wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agcnn.overlays import DEFAULT_TOP, FindingMap, choose_findings, overlay_figure, write_overlay

PROBS = np.array([
    [0.9, 0.1, 0.6, 0.2],
    [0.1, 0.2, 0.3, 0.4],
])


@pytest.mark.parametrize(
    "thresholds,top,expected,left",
    [
        ([0.5, 0.5, 0.5, 0.5], None, [[0, 2], []], [0, 0]),
        ([0.5, None, 0.7, 0.35], None, [[0], [3]], [0, 0]),
        ([0.5, 0.5, 0.5, 0.5], 1, [[0], [3]], [0, 0]),
        (None, None, [[0, 2, 3], [3, 2, 1]], [0, 0]),
        (None, 2, [[0, 2], [3, 2]], [0, 0]),
        ([0.0, 0.0, 0.0, 0.0], 0, [[0, 2], [3, 2]], [2, 2]),
    ],
)
def test_choose_findings(thresholds, top, expected, left):
    chosen, left_out = choose_findings(PROBS, thresholds, top, max_panels=2 if thresholds == [0.0] * 4 else 6)
    assert chosen == expected and left_out == left
    assert DEFAULT_TOP == 3


def test_negative_top_is_refused():
    with pytest.raises(ValueError, match="overlay top"):
        choose_findings(PROBS, None, -1)


def _kwargs(findings):
    return dict(preview=np.full((40, 50), 100, np.uint8), height=80, width=100, box=(10, 20, 60, 70),
                field=(0, 0, 100, 80), heatmap=np.random.default_rng(0).random((8, 8)), findings=findings)


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]


def test_panels_share_one_colour_scale_and_say_when_a_map_is_empty():
    strong = np.zeros((8, 8), np.float32)
    strong[2:4, 2:4] = 3.0
    weak = strong / 3
    fig = overlay_figure(**_kwargs([
        FindingMap("Nodule", 0.83, strong), FindingMap("Mass", 0.61, weak), FindingMap("Effusion", 0.55, -strong),
    ]))
    texts = _texts(fig)
    assert "Nodule (0.83)" in texts and "Mass (0.61)" in texts and "Effusion (0.55)" in texts
    assert texts.count("no positive evidence") == 1
    # Every coloured map uses the same norm, up to the largest value shown, and one colour bar shows it.
    norms = {(im.norm.vmin, im.norm.vmax) for ax in fig.axes[1:4] for im in ax.images[1:]}
    assert norms == {(0.0, 3.0)}
    assert any("one scale" in ax.get_ylabel() for ax in fig.axes)


def test_no_finding_called_positive_is_said_in_the_picture(tmp_path):
    fig = overlay_figure(**_kwargs([]))
    assert "no finding called positive" in _texts(fig)
    write_overlay(tmp_path / "a" / "x.png", **_kwargs([]), left_out=0)
    assert (tmp_path / "a" / "x.png").stat().st_size > 1000
    fig = overlay_figure(**_kwargs([FindingMap("Mass", 0.7, np.ones((8, 8)))]), left_out=3)
    assert "3 more findings called positive are not shown" in fig.texts[0].get_text()


@pytest.mark.parametrize("method", ["cam", pytest.param("gradcam", marks=pytest.mark.slow)])
def test_predict_overlays_show_the_fusion_cam_of_the_called_findings(tmp_path, method, monkeypatch):
    import cv2

    from agcnn import overlays
    from agcnn.checkpoint import save_checkpoint
    from agcnn.config import Config
    from agcnn.labels import LABELS
    from agcnn.models import AGCNN
    from agcnn.predict import predict_folder

    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64}, "data": {"image_size": 64, "resize": 72}})
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64)
    ckpt = tmp_path / "m.pt"
    # Operating points: two findings always called, the rest never.
    points = [0.0, None, 0.0] + [1.1] * (len(LABELS) - 3)
    save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, operating_points={"fusion": points})
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        cv2.imwrite(str(inp / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (90, 70), dtype=np.uint8))
    seen = []
    real = overlays.write_overlay
    monkeypatch.setattr(overlays, "write_overlay", lambda path, **kw: (seen.append(kw), real(path, **kw)))
    predict_folder(ckpt, inp, tmp_path / "out", overlays=True, explain=method, progress=False)
    assert len(seen) == 2 and len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2
    for kw in seen:
        assert [f.finding for f in kw["findings"]] in (["Atelectasis", "Effusion"], ["Effusion", "Atelectasis"])
        assert all(f.cam.shape == (64, 64) for f in kw["findings"])
        assert kw["map_name"] == ("fusion CAM" if method == "cam" else "fusion Grad-CAM")
