from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from agcnn.data.geometry import scaled_resize
from agcnn.data.transforms import IMAGENET_MEAN, build_transform, denormalize


@pytest.mark.parametrize(
    "train,resize,image_size,highres,shape_in,expected",
    [
        (False, 256, 224, 224, (1, 512, 512), (3, 224, 224)),
        (True, 256, 224, 224, (1, 512, 512), (3, 224, 224)),
        (False, 256, 224, 448, (1, 300, 400), (3, 448, 448)),
        (True, 256, 224, 512, (1, 1024, 1024), (3, 512, 512)),
        (False, 64, 56, 112, (1, 90, 70), (3, 112, 112)),
    ],
)
def test_shapes(train, resize, image_size, highres, shape_in, expected):
    t = build_transform(train=train, resize=resize, image_size=image_size, highres_size=highres)
    out = t(torch.rand(shape_in))
    assert out.shape == expected and out.dtype == torch.float32
    # Three identical channels before normalisation.
    back = denormalize(out)
    assert torch.allclose(back[0], back[1], atol=1e-5) and torch.allclose(back[1], back[2], atol=1e-5)


def test_uint8_input_is_scaled():
    t = build_transform(train=False, resize=32, image_size=28)
    out = t(torch.full((1, 40, 40), 255, dtype=torch.uint8))
    assert torch.allclose(denormalize(out), torch.ones(3, 28, 28), atol=1e-5)
    zero = t(torch.zeros(1, 40, 40, dtype=torch.uint8))
    assert torch.allclose(zero[0], torch.full((28, 28), -IMAGENET_MEAN[0] / 0.229), atol=1e-4)


def test_highres_covers_the_same_field_of_view():
    # A smooth image with structure everywhere, so a shifted crop would show.
    y, x = torch.meshgrid(torch.linspace(0, 1, 600), torch.linspace(0, 1, 600), indexing="ij")
    img = (0.5 + 0.25 * torch.sin(9 * x) * torch.cos(7 * y) + 0.2 * x)[None]
    low = build_transform(train=False, resize=256, image_size=224, highres_size=224)(img)
    high = build_transform(train=False, resize=256, image_size=224, highres_size=448)(img)
    down = F.interpolate(high[None], size=224, mode="bilinear", antialias=True, align_corners=False)[0]
    assert (down - low).abs().mean() < 0.01
    # A crop offset by a few pixels would differ clearly.
    shifted = F.interpolate(high[None, :, 8:, 8:], size=224, mode="bilinear", antialias=True)[0]
    assert (shifted - low).abs().mean() > 0.03


def test_scaled_resize():
    assert scaled_resize(256, 224, 224) == 256
    assert scaled_resize(256, 224, 448) == 512
    with pytest.raises(ValueError, match="highres_size=112 is smaller than data.image_size=224"):
        scaled_resize(256, 224, 112)
    with pytest.raises(ValueError, match="resize=200"):
        scaled_resize(200, 224, 224)


def test_training_transform_is_random_eval_is_not():
    img = torch.rand(1, 64, 64)
    train = build_transform(train=True, resize=64, image_size=56)
    ev = build_transform(train=False, resize=64, image_size=56)
    torch.manual_seed(0)
    assert not torch.equal(train(img), train(img))
    assert torch.equal(ev(img), ev(img))


def test_crop_scale_comes_from_config_and_is_checked():
    from agcnn.config import DataConfig
    from agcnn.data.transforms import transforms_from_config

    cfg = DataConfig(resize=64, image_size=64, highres_size=64, crop_scale=[1.0, 1.0])
    img = torch.rand(1, 80, 80)
    torch.manual_seed(0)
    # Full-area crops of a square image: training output is the evaluation output or its mirror.
    train_out = transforms_from_config(cfg, train=True)(img)
    eval_out = transforms_from_config(cfg, train=False)(img)
    assert torch.allclose(train_out, eval_out, atol=1e-5) or torch.allclose(train_out, eval_out.flip(-1), atol=1e-5)
    with pytest.raises(ValueError, match=r"data.crop_scale=\[0.5, 0.2\]"):
        transforms_from_config(DataConfig(crop_scale=[0.5, 0.2]), train=True)


def _windows_of(resized: torch.Tensor, crop: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (top, left, flipped) window of ``resized`` [H, W] that equals ``crop`` [S, S]."""
    s = crop.shape[-1]
    tops, lefts = torch.meshgrid(torch.arange(resized.shape[0] - s + 1), torch.arange(resized.shape[1] - s + 1), indexing="ij")
    tops, lefts = tops.flatten(), lefts.flatten()
    # A few pixels first rule out almost every window; the survivors are compared in full.
    ys, xs = torch.tensor([0, 3, s // 2, s - 1, 7, s - 5]), torch.tensor([0, s - 1, s // 3, 5, s // 2, s - 2])
    samples = resized[tops[:, None] + ys, lefts[:, None] + xs]
    found = []
    for flipped, target in ((False, crop), (True, crop.flip(-1))):
        close = (samples - target[ys, xs]).abs().amax(dim=1) < 1e-5
        for t, l in zip(tops[close].tolist(), lefts[close].tolist()):
            if torch.allclose(resized[t:t + s, l:l + s], target, atol=1e-5):
                found.append((t, l, flipped))
    return sorted(found)


@pytest.mark.parametrize("config", ["agcnn_r50.yaml", "agcnn_densenet121.yaml"])
def test_paper_training_crop_is_a_window_of_the_256_resize(config):
    from pathlib import Path

    from agcnn.config import Config
    from agcnn.data.transforms import transforms_from_config

    cfg = Config.load(Path(__file__).resolve().parents[2] / "configs" / config)
    d = cfg.data
    assert (d.augment, d.resize, d.image_size, d.highres_size) == ("paper", 256, 224, 224)
    img = torch.rand(1, 300, 280)
    # The evaluation transform's first step, before its centre crop (Sec. 4.2: resize to 256).
    resized = v2.Resize((d.resize, d.resize), antialias=True)(img)[0]
    train_t = transforms_from_config(d, train=True)
    torch.manual_seed(0)
    seen = []
    for _ in range(6):
        crop = denormalize(train_t(img))[0]
        hits = _windows_of(resized.clamp(0, 1), crop)
        assert len(hits) == 1, "a paper training crop is exactly one window of the 256 px resize, no zoom"
        seen.append(hits[0])
    assert {f for _, _, f in seen} == {False, True}  # flipped and not
    assert len({(t, l) for t, l, _ in seen}) > 1  # the window moves
    # Evaluation: the centre window, unflipped.
    centre = denormalize(transforms_from_config(d, train=False)(img))[0]
    assert _windows_of(resized.clamp(0, 1), centre) == [(16, 16, False)]


def test_resized_crop_zooms_and_unknown_augment_is_refused():
    img = torch.rand(1, 64, 64)
    torch.manual_seed(0)
    zoomed = build_transform(train=True, resize=64, image_size=56, crop_scale=(0.3, 0.5), augment="resized_crop")(img)
    resized = v2.Resize((64, 64), antialias=True)(img)[0]
    assert _windows_of(resized.clamp(0, 1), denormalize(zoomed)[0]) == []
    with pytest.raises(ValueError, match=r"unknown data.augment 'paperr'.*Did you mean 'paper'"):
        build_transform(train=True, augment="paperr")
