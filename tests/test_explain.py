"""Class activation maps of every branch: exactness with average pooling, pasting, Grad-CAM agreement."""

from __future__ import annotations

import pytest
import torch

from agcnn.explain import cam_boxes, explain, paste_into_boxes
from agcnn.models import AGCNN
from agcnn.models.roi import crop_regions


def tiny(pool: str = "avg", attention: str = "none", seed: int = 0) -> AGCNN:
    torch.manual_seed(seed)
    return AGCNN(14, backbone="resnet18", attention=attention, pool=pool, image_size=64, local_size=64, threshold=0.5).eval()


def test_cam_decomposes_the_logits_exactly_with_average_pooling():
    model = tiny("avg")
    x = torch.randn(3, 3, 64, 64)
    ex = explain(model, x)
    n = ex.native
    assert ex.maps["global"].shape == ex.maps["local"].shape == ex.maps["fusion"].shape == (3, 14, 64, 64)
    torch.testing.assert_close(n["global"].mean((2, 3)) + model.global_branch.classifier.bias, ex.logits["global"])
    torch.testing.assert_close(n["local"].mean((2, 3)) + model.local_branch.classifier.bias, ex.logits["local"])
    fused = n["fusion_global"].mean((2, 3)) + n["fusion_local"].mean((2, 3)) + model.fusion.bias
    torch.testing.assert_close(fused, ex.logits["fusion"])
    # The model's own output is what the maps explain.
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(ex.logits["fusion"], out.fusion_logits)
    assert torch.equal(ex.boxes, out.boxes)


def test_cam_with_max_pooling_is_not_a_decomposition():
    model = tiny("max")
    ex = explain(model, torch.randn(2, 3, 64, 64))
    gap = (ex.native["global"].mean((2, 3)) + model.global_branch.classifier.bias - ex.logits["global"]).abs().max()
    assert gap > 1e-3


def test_requested_findings_select_the_rows_of_the_full_maps():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    full = explain(model, x)
    some = explain(model, x, classes=torch.tensor([[5, 1], [0, 13]]))
    for branch in ("global", "local", "fusion"):
        torch.testing.assert_close(some.maps[branch][0, 0], full.maps[branch][0, 5])
        torch.testing.assert_close(some.maps[branch][1, 1], full.maps[branch][1, 13])
    single = explain(model, x, classes=torch.tensor([2, 3]))
    assert single.maps["fusion"].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("bad", [torch.tensor([[14]]), torch.tensor([[0]]), torch.tensor([[-1], [0]])])
def test_bad_classes_are_refused(bad):
    with pytest.raises(ValueError, match="classes"):
        explain(tiny(), torch.randn(2, 3, 64, 64), classes=bad)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="gradcam"):
        explain(tiny(), torch.randn(1, 3, 64, 64), method="gradcamm")


def test_paste_fills_exactly_the_box_pixels():
    maps = torch.ones(2, 1, 3, 3)
    boxes = torch.tensor([[2, 3, 5, 7], [0, 0, 8, 8]])
    out = paste_into_boxes(maps, boxes, 8)
    expected = torch.zeros(8, 8)
    expected[3:7, 2:5] = 1
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1, 0], torch.ones(8, 8))


def test_paste_undoes_the_crop():
    # A smooth image cropped by the region step and pasted back lands where it came from.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    image = (xx * 2 + yy)[None, None]
    boxes = torch.tensor([[4, 6, 20, 30]])
    crop = crop_regions(image, boxes, 32, 16)
    back = paste_into_boxes(crop, boxes, 32)[0, 0]
    inner = (slice(8, 28), slice(6, 18))
    torch.testing.assert_close(back[inner], image[0, 0][inner], atol=1e-3, rtol=0)
    assert back[:6].abs().max() == 0 and back[:, 20:].abs().max() == 0


def test_cam_boxes_recover_a_grid_aligned_block_and_flag_empty_maps():
    from agcnn.models.roi import upsample_bilinear

    grid = torch.zeros(1, 8, 8)
    grid[0, 3:6, 2:5] = 2.0
    up = upsample_bilinear(grid, 64)
    boxes, empty = cam_boxes(torch.stack([up[0], -up[0]])[None])
    assert boxes[0, 0].tolist() == [16, 24, 40, 48]
    assert boxes[0, 1].tolist() == [0, 0, 64, 64] and empty.tolist() == [[False, True]]
    with pytest.raises(ValueError, match="half-maximum"):
        cam_boxes(up, threshold=1.0)


@pytest.mark.parametrize("attention,pool", [("se", "avg"), ("self", "max")])
def test_gradcam_from_monai_equals_relu_cam_for_a_pooled_linear_head(attention, pool):
    model = tiny(pool, attention)
    x = torch.randn(1, 3, 64, 64)
    classes = torch.tensor([[3]])
    cam = explain(model, x, classes)
    grad = explain(model, x, classes, method="gradcam")
    assert not model.training  # MONAI must not leave the model in training mode
    for key in ("global", "local", "fusion_global", "fusion_local"):
        torch.testing.assert_close(grad.native[key], cam.native[key].relu(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.boxes, cam.boxes)
    # Maps on the image grid differ only by where the ReLU is applied (before vs after resampling).
    for branch in ("global", "local"):
        assert (grad.maps[branch] >= 0).all()
    # The hooks MONAI registers stay on throw-away modules, never on the model.
    assert not model.global_branch.features._forward_hooks and not model.global_branch.features._backward_hooks
