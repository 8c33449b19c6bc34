"""The batched device transforms against the CPU transforms they replace."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from agcnn.data.device_transforms import DeviceTransform, random_crop_params, resized_crop_params
from agcnn.data.transforms import build_transform

HAS_AUGMENT = "augment" in inspect.signature(build_transform).parameters


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 1, size, size]: smooth shapes plus noise, so crops and flips are distinguishable."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 120 + 80 * torch.sin(6 * xx + 3 * yy) * torch.cos(4 * yy)
    noise = torch.randint(-30, 31, (n, 1, size, size), generator=g)
    return (base + noise + 10 * torch.arange(n).view(n, 1, 1, 1)).clamp(0, 255).to(torch.uint8)


def _cpu_with_recorded_params(augment: str, flip: bool, **sizes):
    """The CPU training transform, recording the crop it draws; the flip forced on or off."""
    kwargs = {"augment": augment} if HAS_AUGMENT else {}
    t = build_transform(train=True, **sizes, **kwargs)
    drawn = []
    for op in t.transforms:
        if isinstance(op, (v2.RandomResizedCrop, v2.RandomCrop)):
            original = op.make_params

            def record(flat_inputs, original=original):
                params = original(flat_inputs)
                drawn.append(params)
                return params

            op.make_params = record
        if isinstance(op, v2.RandomHorizontalFlip):
            op.p = 1.0 if flip else 0.0
    return t, drawn


CASES = [("resized_crop", dict(resize=64, image_size=56)), ("resized_crop", dict(resize=64, image_size=56, highres_size=112))]
if HAS_AUGMENT:
    CASES += [("paper", dict(resize=64, image_size=56)), ("paper", dict(resize=64, image_size=56, highres_size=112))]


@pytest.mark.parametrize("augment,sizes", CASES)
@pytest.mark.parametrize("flip", [False, True])
def test_training_transform_matches_cpu_with_the_same_draws(augment, sizes, flip):
    images = _images(12, 96)
    cpu_t, drawn = _cpu_with_recorded_params(augment, flip, **sizes)
    expected = torch.stack([cpu_t(img.float() / 255.0) for img in images])
    box = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in drawn])
    dev = DeviceTransform(train=True, augment=augment, **sizes)
    got = dev(images, params=(box, torch.full((len(images),), flip)))
    assert got.shape == expected.shape == (12, 3, dev.side, dev.side) and got.dtype == torch.float32
    if augment == "paper":
        # A crop of exactly the output size samples each pixel at its centre: bit for bit.
        assert torch.equal(got, expected)
    else:
        # Same crop, resized by roi_align's area samples instead of the antialias filter:
        # the same picture within a few grey levels (normalised units: 1 grey level ~ 0.017).
        diff = (got - expected).abs()
        assert diff.mean() < 0.03 and diff.amax() < 0.5, (diff.mean(), diff.amax())
        # ...and much closer to it than to the unflipped / flipped other one.
        assert (got - expected.flip(-1)).abs().mean() > 5 * diff.mean()


@pytest.mark.parametrize("highres", [None, 112])
def test_evaluation_transform_is_the_cpu_one_bit_for_bit(highres):
    images = _images(5, 96, seed=1)
    cpu_t = build_transform(train=False, resize=64, image_size=56, highres_size=highres)
    expected = torch.stack([cpu_t(img.float() / 255.0) for img in images])
    got = DeviceTransform(train=False, resize=64, image_size=56, highres_size=highres)(images)
    assert torch.equal(got, expected)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = torch.cat([a, b]).unique()
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_resized_crop_draws_follow_torchvision_distribution():
    n, size = 3000, 256
    for scale in ((0.08, 1.0), (0.6, 1.0), (0.95, 1.0)):
        ours = resized_crop_params(n, size, scale, torch.Generator().manual_seed(0)).double()
        op = v2.RandomResizedCrop(224, scale=scale)
        torch.manual_seed(0)
        image = [torch.zeros(1, size, size)]
        ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                            for p in (op.make_params(image) for _ in range(n))]).double()
        top, left, h, w = ours.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
        # Same distributions: a KS gap of 0.06 is far beyond chance for 3000 draws each
        # (p < 0.001 at 0.05), and far below what a wrong range, rounding or fallback gives.
        for name, a, b in (("area", h * w, ref[:, 2] * ref[:, 3]), ("aspect", w / h, ref[:, 3] / ref[:, 2]),
                           ("top", top, ref[:, 0]), ("left", left, ref[:, 1]),
                           ("whole image", (h == size).double(), (ref[:, 2] == size).double())):
            assert _ks(a, b) < 0.06, (scale, name, _ks(a, b))


def test_random_crop_draws_every_position_uniformly():
    box = random_crop_params(20000, 10, 8, torch.Generator().manual_seed(0))
    assert (box[:, 2:] == 8).all()
    counts = torch.bincount(box[:, 0], minlength=3).double()
    assert counts.numel() == 3 and (counts / counts.sum() - 1 / 3).abs().max() < 0.02
    with pytest.raises(ValueError, match="larger than the image"):
        random_crop_params(1, 8, 10, torch.Generator())


def test_draws_are_reproducible_per_seed_and_flip_half_the_time():
    a = DeviceTransform(train=True, resize=64, image_size=56, seed=3)
    b = DeviceTransform(train=True, resize=64, image_size=56, seed=3)
    box_a, flip_a = a.draw(1000)
    box_b, flip_b = b.draw(1000)
    assert torch.equal(box_a, box_b) and torch.equal(flip_a, flip_b)
    assert 0.45 < flip_a.double().mean() < 0.55
    b.reseed(4)
    assert not torch.equal(b.draw(1000)[0], box_a)


def test_bad_input_is_refused_with_the_reason():
    t = DeviceTransform(train=False, resize=64, image_size=56)
    with pytest.raises(ValueError, match="integer grey levels"):
        t(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 1, C, C\]"):
        t(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="data.augment='zoom'"):
        DeviceTransform(train=True, augment="zoom")


def test_uint16_cache_levels_scale_to_the_same_image():
    images = _images(3, 64, seed=2)
    t = DeviceTransform(train=False, resize=64, image_size=56)
    wide = (images.to(torch.int32) * 257).to(torch.uint16)  # 255 * 257 = 65535
    torch.testing.assert_close(t(wide), t(images), atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True])
def test_cuda_matches_cpu(train):
    images = _images(16, 96, seed=5)
    t = DeviceTransform(train=train, resize=64, image_size=56, highres_size=112)
    params = t.draw(16)
    cpu = t(images, params=params)
    gpu = t.to("cuda")(images.cuda(), params=params)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
