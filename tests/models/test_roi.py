"""The region step against a per-image numpy + scikit-image reference, and golden boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from agcnn.models import roi
from agcnn.models.roi import (
    attention_boxes,
    attention_heatmap,
    attention_mask,
    boxes_from_heatmap,
    connected_components,
    crop_regions,
    largest_component_boxes,
    upsample_bilinear,
)

measure = pytest.importorskip("skimage.measure", reason="scikit-image provides the reference labelling")


# ---------------------------------------------------------------------------- reference

def _np_upsample(hm: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel bilinear, edge-clamped, rows then columns, float32 -- written independently."""

    def axis(n_in: int):
        src = np.maximum((np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, fy = axis(hm.shape[0])
    x0, x1, fx = axis(hm.shape[1])
    one = np.float32(1)
    rows = hm[y0, :] * (one - fy)[:, None] + hm[y1, :] * fy[:, None]
    return rows[:, x0] * (one - fx)[None, :] + rows[:, x1] * fx[None, :]


def reference_box(features: np.ndarray, image_size: int, threshold: float) -> tuple[int, int, int, int]:
    """One image: Eq. 3 heatmap, min-max, upsample, threshold, skimage label, largest, bbox."""
    hm = np.abs(features.astype(np.float32)).max(axis=0)
    lo, hi = hm.min(), hm.max()
    hm = (hm - lo) / (hi - lo) if hi > lo else np.zeros_like(hm)
    mask = _np_upsample(hm.astype(np.float32), image_size) > threshold
    return reference_mask_box(mask)


def reference_mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    labels = measure.label(mask, connectivity=2)
    if labels.max() == 0:
        return (0, 0, mask.shape[1], mask.shape[0])
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    best = int(np.argmax(counts))  # first maximum: lowest label wins ties
    ys, xs = np.nonzero(labels == best)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ---------------------------------------------------------------------------- exactness

@pytest.mark.parametrize(
    "h,image_size,threshold,count",
    [(7, 224, 0.7, 100), (7, 64, 0.7, 500), (4, 64, 0.5, 300), (8, 100, 0.3, 300), (14, 112, 0.7, 200), (2, 64, 0.7, 100)],
)
def test_boxes_match_per_image_reference_on_random_features(h, image_size, threshold, count):
    gen = torch.Generator().manual_seed(h * 1000 + image_size)
    # Several kinds of maps: plain noise, smooth blobs (few large components), heavy-tailed.
    feats = [
        torch.randn(count, 4, h, h, generator=gen),
        torch.nn.functional.avg_pool2d(torch.randn(count, 4, h + 2, h + 2, generator=gen), 3, stride=1),
        torch.randn(count, 4, h, h, generator=gen) ** 3,
    ]
    features = torch.cat(feats)
    expected = [reference_box(f.numpy(), image_size, threshold) for f in features]
    got = attention_boxes(features, image_size, threshold)
    assert got.dtype == torch.int64 and got.shape == (features.shape[0], 4)
    mask = attention_mask(features, image_size, threshold)
    for backend, boxes in (("auto", got), ("torch", largest_component_boxes(mask, "torch")), ("scipy", largest_component_boxes(mask, "scipy"))):
        mismatches = [(i, tuple(boxes[i].tolist()), e) for i, e in enumerate(expected) if tuple(boxes[i].tolist()) != e]
        assert not mismatches, f"{backend}: {len(mismatches)} of {len(expected)} boxes differ, first: {mismatches[:3]}"


def test_components_match_skimage_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    # Random masks at several densities, including percolating ones with long, winding components.
    masks = torch.cat([torch.rand(100, 40, 50, generator=gen) < p for p in (0.2, 0.45, 0.6, 0.9)])
    labels = connected_components(masks)
    for m, lab in zip(masks.numpy(), labels.numpy()):
        ref = measure.label(m, connectivity=2)
        # Same partition: our label is the raster index of the first pixel of the component.
        for k in range(1, ref.max() + 1):
            ours = np.unique(lab[ref == k])
            assert ours.size == 1
            first = np.flatnonzero((ref == k).ravel())[0]
            assert ours[0] == first
        assert (lab[~m] == m.size).all()
    expected = [reference_mask_box(m) for m in masks.numpy()]
    for backend in ("torch", "scipy"):
        got = largest_component_boxes(masks, backend)
        assert [tuple(b) for b in got.tolist()] == expected, backend


def test_spiral_component_converges():
    # A one-pixel-wide spiral: the worst case for plain label propagation.
    n = 61
    m = np.zeros((n, n), bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = True
        m[top : bottom + 1, right] = True
        m[bottom, left : right + 1] = True
        m[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            m[top, left - 1] = True
    labels = connected_components(torch.from_numpy(m)[None])[0].numpy()
    ref = measure.label(m, connectivity=2)
    assert len(np.unique(labels[m])) == ref.max()


# ---------------------------------------------------------------------------- golden boxes

def _features_from_heatmap(hm: np.ndarray) -> torch.Tensor:
    # Two channels whose |max| is the heatmap: sign flips must not matter (Eq. 3 uses |f|).
    t = torch.from_numpy(hm.astype(np.float32))
    return torch.stack([-t, 0.5 * t])[None]


def test_one_blob():
    hm = np.zeros((7, 7))
    hm[2:4, 3:5] = 1.0
    box = attention_boxes(_features_from_heatmap(hm), 70, 0.7)[0].tolist()
    # 10 px per cell, cell centres at 10c + 5. Between a 0-cell and a 1-cell the value rises
    # linearly across the 10 px between their centres, passing 0.7 at 7 px: the box starts
    # 2 px inside the first hot cell (x = 32, y = 22) and ends 2 px short of the last (48, 38).
    assert box == [32, 22, 48, 38]


def test_two_blobs_largest_wins():
    hm = np.zeros((7, 7))
    hm[0, 0] = 1.0  # small
    hm[4:7, 4:7] = 1.0  # large
    # Edge-clamped interpolation keeps the border cells hot up to the image edge.
    assert attention_boxes(_features_from_heatmap(hm), 70, 0.7)[0].tolist() == [42, 42, 70, 70]


def test_two_equal_blobs_tie_goes_to_first_in_raster_order():
    hm = np.zeros((7, 7))
    hm[5, 1] = 1.0
    hm[1, 5] = 1.0  # same size, first in raster order
    x0, y0, x1, y1 = attention_boxes(_features_from_heatmap(hm), 70, 0.7)[0].tolist()
    assert y1 <= 30 and x0 >= 40


def test_flat_map_gives_whole_image():
    feats = torch.ones(3, 8, 7, 7)
    feats[1] = 0
    feats[2] = -2.5
    assert attention_boxes(feats, 224).tolist() == [[0, 0, 224, 224]] * 3
    assert attention_heatmap(feats).abs().sum() == 0


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_empty_mask_gives_whole_image_mixed_with_nonempty(backend):
    mask = torch.zeros(3, 10, 12, dtype=torch.bool)
    mask[1, 2:4, 5:9] = True
    assert largest_component_boxes(mask, backend).tolist() == [[0, 0, 12, 10], [5, 2, 9, 4], [0, 0, 12, 10]]
    with pytest.raises(ValueError, match="valid: auto, torch, scipy"):
        largest_component_boxes(mask, "cuda")


def test_upsample_matches_interpolate_up_to_rounding():
    hm = torch.rand(4, 7, 7)
    ours = upsample_bilinear(hm, 224)
    ref = torch.nn.functional.interpolate(hm[:, None], size=224, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_invalid_threshold_and_shape_rejected():
    with pytest.raises(ValueError, match="threshold"):
        attention_boxes(torch.rand(1, 2, 7, 7), 224, threshold=1.5)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        attention_boxes(torch.rand(2, 7, 7), 224)


# ---------------------------------------------------------------------------- crop

def test_crop_is_exact_on_integer_box_at_same_size():
    # A box of exactly out_size pixels, same resolution: the crop is the pixels themselves,
    # channel by channel (no reshape scrambling of channels into space).
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    boxes = torch.tensor([[2, 3, 10, 11], [8, 8, 16, 16]])
    crops = crop_regions(img, boxes, box_size=16, out_size=8)
    torch.testing.assert_close(crops[0], img[0, :, 3:11, 2:10])
    torch.testing.assert_close(crops[1], img[1, :, 8:16, 8:16])


def test_crop_from_highres_copy_sees_the_same_region():
    # The high-resolution copy is the low-res one at 4x: a box on the 16 px grid must crop the
    # same field of view, with 4x the detail.
    hi = torch.rand(1, 3, 64, 64)
    lo = torch.nn.functional.avg_pool2d(hi, 4)
    box = torch.tensor([[4, 2, 12, 10]])
    crop_hi = crop_regions(hi, box, box_size=16, out_size=32)
    torch.testing.assert_close(crop_hi, hi[:, :, 8:40, 16:48])
    crop_lo = crop_regions(lo, box, box_size=16, out_size=8)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(crop_hi, 4), crop_lo, atol=1e-5, rtol=0)


def test_crop_rejects_wrong_box_shape():
    with pytest.raises(ValueError, match="boxes must be"):
        crop_regions(torch.rand(2, 3, 8, 8), torch.zeros(3, 4), 8, 4)


# ---------------------------------------------------------------------------- host synchronisation

class _HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's value on the host -- a stream synchronisation on a
    GPU -- or builds a tensor from host data (a host -> device copy there). Runs on the CPU."""

    NAMES = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "equal", "cpu",
             "nonzero", "unique", "masked_select", "tensor", "as_tensor", "from_numpy"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        # Indexing with a boolean mask has a data-dependent shape: also a read.
        if name in self.NAMES or (name == "__getitem__" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in torch.utils._pytree.tree_leaves(args[1:]))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _spiral(n: int = 61) -> torch.Tensor:
    m = np.zeros((n, n), bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = True
        m[top : bottom + 1, right] = True
        m[bottom, left : right + 1] = True
        m[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            m[top, left - 1] = True
    return torch.from_numpy(m)


def _count_rounds(monkeypatch) -> list[int]:
    rounds = [0]
    original = roi._round

    def counted(*args, **kwargs):
        rounds[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(roi, "_round", counted)
    return rounds


@pytest.mark.parametrize("check_every", [1, roi.CHECK_EVERY, 5])
def test_components_read_the_host_once_per_block_of_rounds(monkeypatch, check_every):
    # One jump per round makes the spirals take 11 rounds, i.e. several blocks; a sync per
    # round (or per jump) would show as several times the reads.
    monkeypatch.setattr(roi, "JUMPS_PER_ROUND", 1)
    masks = torch.stack([_spiral(), _spiral().T, torch.zeros(61, 61, dtype=torch.bool)])
    rounds = _count_rounds(monkeypatch)
    with _HostReads() as reads:
        labels = connected_components(masks, check_every=check_every)
    assert rounds[0] % check_every == 0 and rounds[0] // check_every >= 2
    assert reads.calls == ["__bool__"] * (rounds[0] // check_every)
    assert [len(np.unique(lab[m])) for lab, m in zip(labels.numpy(), masks.numpy())] == [1, 1, 0]


def test_region_step_reads_the_host_only_for_convergence_checks(monkeypatch):
    # Heatmap, upsampling, mask, components, boxes and crop together: the only host reads are
    # the components' checks (the tensor backend, which runs on the GPU).
    gen = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.avg_pool2d(torch.randn(6, 8, 9, 9, generator=gen), 3, stride=1)
    feats[5] = 0  # flat map: empty mask, whole-image box
    images = torch.rand(6, 3, 112, 112, generator=gen)
    rounds = _count_rounds(monkeypatch)
    with _HostReads() as reads:
        mask = upsample_bilinear(attention_heatmap(feats), 56) > 0.7
        boxes = largest_component_boxes(mask, "torch")
        crops = crop_regions(images, boxes, 56, 32)
    assert rounds[0] >= roi.CHECK_EVERY
    assert reads.calls == ["__bool__"] * -(-rounds[0] // roi.CHECK_EVERY)
    assert crops.shape == (6, 3, 32, 32) and boxes[5].tolist() == [0, 0, 56, 56]
    assert boxes.tolist() == largest_component_boxes(mask, "scipy").tolist()


def test_host_read_counter_sees_a_reintroduced_sync():
    # The counter itself: the equality test the rounds used to run must register.
    with _HostReads() as reads:
        torch.equal(torch.ones(2), torch.ones(2))
        torch.tensor([0, 0, 4, 4])
        _ = torch.ones(3)[torch.ones(3) > 0]
    assert reads.calls == ["equal", "tensor", "__getitem__"]


@pytest.mark.gpu
def test_tensor_backend_on_cuda_matches_cpu_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    features = torch.cat([
        torch.randn(300, 4, 7, 7, generator=gen),
        torch.nn.functional.avg_pool2d(torch.randn(300, 4, 9, 9, generator=gen), 3, stride=1),
        torch.randn(300, 4, 7, 7, generator=gen) ** 3,
    ])
    expected = [reference_box(f.numpy(), 224, 0.7) for f in features]
    cuda = features.cuda()
    mask_cpu, mask_gpu = attention_mask(features, 224), attention_mask(cuda, 224)
    assert torch.equal(mask_gpu.cpu(), mask_cpu)
    assert torch.equal(connected_components(mask_gpu).cpu(), connected_components(mask_cpu))
    boxes = attention_boxes(cuda, 224)  # auto: the tensor backend on CUDA
    assert boxes.device.type == "cuda"
    assert [tuple(b) for b in boxes.tolist()] == expected
    images = torch.rand(len(features), 3, 224, 224, generator=gen)
    crops_cpu = crop_regions(images, boxes.cpu(), 224, 224)
    torch.testing.assert_close(crop_regions(images.cuda(), boxes, 224, 224).cpu(), crops_cpu, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_rounds_synchronise_once_per_block(monkeypatch):
    import warnings

    # The whole region step on CUDA (heatmap, upsampling, components, boxes, crop): the only
    # synchronisations are the convergence checks -- none hidden inside a kernel's launch
    # (torch.bincount, for one, reads its input's maximum back).
    gen = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.avg_pool2d(torch.randn(64, 8, 9, 9, generator=gen), 3, stride=1).cuda()
    images = torch.rand(64, 3, 224, 224, generator=gen).cuda()
    mask = torch.stack([_spiral(), _spiral().T]).cuda()
    rounds = _count_rounds(monkeypatch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            connected_components(mask)
            spiral_rounds = rounds[0]
            crop_regions(images, boxes_from_heatmap(attention_heatmap(feats), 224), 224, 224)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    step_rounds = rounds[0] - spiral_rounds
    assert len(syncs) == spiral_rounds // roi.CHECK_EVERY + step_rounds // roi.CHECK_EVERY, [str(w.message) for w in syncs]
