"""The evaluation transform's geometry: boxes between original pixels and the model's input."""

from __future__ import annotations

import pytest
import torch

from agcnn.data.geometry import Geometry, centre_offset
from agcnn.data.transforms import build_transform


@pytest.mark.parametrize(
    "geometry, size, box, expected",
    [
        # 1024 -> 256, crop 224 at offset 16: a box from pixel 64 starts at 0.
        (Geometry(256, 224, 224), (1024, 1024), (64, 64, 1024, 1024), (0, 0, 240, 240)),
        # highres 448 doubles every size before the crop; the input grid is still 224.
        (Geometry(256, 224, 448), (1024, 1024), (64, 64, 1024, 1024), (0, 0, 240, 240)),
        # A non-square original: each axis has its own scale.
        (Geometry(256, 224, 224), (1000, 2000), (1000, 250, 1500, 375), (112, 48, 176, 80)),
    ],
)
def test_to_input_golden(geometry, size, box, expected):
    h, w = size
    assert geometry.to_input(box, height=h, width=w) == pytest.approx(expected)


def test_offset_rounds_as_torchvision_not_by_floor():
    # first = 35, side = 32: torchvision crops at round(1.5) = 2; a floor division would say 1.
    g = Geometry(35, 32, 32)
    assert (g.first, g.offset) == (35, 2)
    assert centre_offset(33, 32) == 0  # round(0.5) = 0: halves go to the even integer


@pytest.mark.parametrize("geometry", [Geometry(35, 32, 32), Geometry(36, 32, 32), Geometry(37, 32, 48), Geometry(72, 64, 128)])
def test_to_input_follows_the_evaluation_transform(geometry):
    # One bright original pixel: after the transform, the brightest input pixel lies in the box
    # to_input gives for that pixel.
    h, w = 97, 131
    transform = build_transform(train=False, resize=geometry.resize, image_size=geometry.image_size,
                                highres_size=geometry.highres_size)
    for y, x in [(48, 65), (30, 40), (70, 100)]:
        img = torch.zeros(1, h, w)
        img[0, y, x] = 1.0
        out = transform(img)[0]
        s = geometry.highres_size / geometry.image_size
        iy, ix = divmod(int(out.argmax()), out.shape[-1])
        x0, y0, x1, y1 = geometry.to_input((x, y, x + 1, y + 1), height=h, width=w)
        # The peak's centre on the high-res tensor, in input-grid units; within one resized pixel.
        cx, cy = (ix + 0.5) / s, (iy + 0.5) / s
        tol = geometry.first / min(h, w) / s + 1 / s
        assert x0 - tol <= cx <= x1 + tol and y0 - tol <= cy <= y1 + tol, (geometry, (x, y), (cx, cy), (x0, y0, x1, y1))


def test_to_original_inverts_to_input_and_widens_to_whole_pixels():
    g = Geometry(256, 224, 224)
    assert g.to_original_float(g.to_input((100, 200, 300, 400), height=1024, width=1024), height=1024, width=1024) == \
        pytest.approx((100, 200, 300, 400))
    back = g.to_original((40, 60, 120, 200), height=1024, width=1024)
    assert g.to_input(back, height=1024, width=1024) == pytest.approx((40, 60, 120, 200))
    # highres 128 at image 64: the box doubles before the crop offset (round((144 - 128) / 2) = 8).
    assert Geometry(72, 64, 128).to_original((0, 0, 64, 64), height=144, width=144) == (8, 8, 136, 136)


def test_field_is_the_centre_crop_in_original_pixels():
    g = Geometry(256, 224, 224)
    assert g.field(height=1024, width=1024) == (64, 64, 960, 960)
    assert g.field(height=512, width=256) == (16, 32, 240, 480)


def test_from_config_and_bad_sizes(small_config):
    cfg = small_config(resize=72)
    assert Geometry.from_config(cfg) == Geometry.from_config(cfg.data) == Geometry(72, 64, 64)
    with pytest.raises(ValueError, match="highres_size=32 is smaller than data.image_size=64"):
        Geometry(72, 64, 32)
    with pytest.raises(ValueError, match="resize=60 is smaller"):
        Geometry(60, 64, 64)
