"""The region step: attention heatmap -> mask -> largest connected region -> box -> crop.

Pure tensor functions, batched, on whatever device the features live on; no per-image Python
loop. The exact order of operations (paper Sec. 3.2, Eq. 3-4), which a per-image reference in
the tests reproduces bit for bit:

1. ``heatmap``: max over channels of |f| (Eq. 3) on the last feature map [B, C, h, w], then
   min-max normalised per image to [0, 1]; a flat map becomes all zeros. (``model.heatmap``
   may draw it from the class activation maps instead: :func:`class_activation_heatmap`,
   :func:`uncertainty_heatmap`; steps 2-5 are the same.)
2. ``upsample``: bilinear, half-pixel centres (``align_corners=False``), edge-clamped, done as
   two separable passes (rows first, then columns) in float32 -- written out here rather than
   left to ``F.interpolate`` so that the arithmetic is defined and identical on every device.
3. ``mask``: upsampled heatmap > tau (Eq. 4; tau = 0.7).
4. The largest 8-connected component of the mask (ties: the component whose first pixel in
   raster order comes first, i.e. the lowest ``skimage.measure.label`` label); its bounding box
   ``(x0, y0, x1, y1)`` with x1/y1 exclusive. An empty mask gives the whole image.
5. ``crop_regions``: one ``torchvision.ops.roi_align`` over the batch, from the same image or a
   higher-resolution copy of it (the box is scaled, not re-computed).

Connected components use min-label propagation with hooking and pointer jumping: every
foreground pixel starts with its own raster index; each round, every pixel looks at the
smallest label in its 3x3 neighbourhood, hands it to the root of its own tree (hooking), and
then all pixels follow their label's label (``L = L[L]``) until they point at a root. Labels
only ever decrease and always name a pixel of the same component, so the fixed point labels
each component with its first pixel. Plain propagation needs as many rounds as a region's
geodesic diameter (~160 on real 224 px masks); hooking and jumping need a handful.

Host synchronisation. On a GPU every value the host reads back (``.item()``, ``torch.equal``,
``bool(t)``, a tensor built from a Python list) stalls the stream until all queued work is done.
The rounds therefore run in blocks of :data:`CHECK_EVERY` with a fixed number of jumps each, and
only the end of a block reads one flag back; every other constant is a Python scalar or made on
the device. Real 224 px masks converge in 3-5 rounds, i.e. one or two checks per batch. Extra
rounds after convergence change nothing (both steps only ever lower a label to the label of a
pixel in the same component, and a fixed point stays fixed), so a block never overshoots.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "attention_boxes",
    "attention_heatmap",
    "attention_mask",
    "boxes_from_heatmap",
    "class_activation_heatmap",
    "uncertainty_heatmap",
    "connected_components",
    "crop_regions",
    "largest_component_boxes",
    "upsample_bilinear",
]


def attention_heatmap(features: Tensor) -> Tensor:
    """[B, C, h, w] feature map -> [B, h, w] heatmap in [0, 1] (paper Eq. 3, then min-max)."""
    if features.dim() != 4:
        raise ValueError(f"features must be [B, C, h, w], got shape {tuple(features.shape)}")
    hm = features.detach().float().abs().amax(dim=1)
    lo = hm.amin(dim=(1, 2), keepdim=True)
    span = hm.amax(dim=(1, 2), keepdim=True) - lo
    # A flat map has no attended region: all zeros, so the mask is empty and the box is the image.
    return torch.where(span > 0, (hm - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(hm))


def class_activation_heatmap(features: Tensor, weight: Tensor) -> Tensor:
    """[B, C, h, w] features and [K, C] classifier weights -> [B, h, w] heatmap in [0, 1]: at each
    position the largest positive class activation map over the K classes (Zhou et al. 2016:
    the classifier applied to each position's features), min-max normalised as the paper's."""
    return attention_heatmap(_class_maps(features, weight).clamp(min=0).amax(dim=1, keepdim=True))


def uncertainty_heatmap(features: Tensor, weight: Tensor, logits: Tensor) -> Tensor:
    """[B, C, h, w] features, [K, C] classifier weights and the branch's [B, K] logits -> [B, h, w]
    heatmap in [0, 1]: the class activation maps weighted by p (1 - p) of each class's probability,
    summed, negative part dropped, min-max normalised.

    p (1 - p) is the derivative of the probability by its logit, so this is Grad-CAM of the summed
    probabilities (Selvaraju et al. 2017; exact with average pooling): it points where the
    features move the calls that are still open. A finding the branch is already sure of
    (p near 0 or 1) weighs almost nothing, one it cannot yet tell (p near 0.5) the most.
    """
    if logits.dim() != 2 or logits.shape != (features.shape[0], weight.shape[0]):
        raise ValueError(f"logits must be [B, K] = {(features.shape[0], weight.shape[0])}, got {tuple(logits.shape)}")
    p = torch.sigmoid(logits.detach().float())
    cams = _class_maps(features, weight) * (p * (1 - p))[:, :, None, None]
    return attention_heatmap(cams.sum(dim=1, keepdim=True).clamp(min=0))


def _class_maps(features: Tensor, weight: Tensor) -> Tensor:
    """[B, C, h, w] features and [K, C] classifier weights -> [B, K, h, w] class activation maps."""
    if features.dim() != 4 or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"features [B, C, h, w] and weight [K, C] must share C, got {tuple(features.shape)} and {tuple(weight.shape)}")
    return torch.einsum("bchw,kc->bkhw", features.detach().float(), weight.detach().float())


def _axis_weights(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Indices and weights of half-pixel bilinear interpolation along one axis (float32)."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = (src - i0).float()
    return i0, i1, frac


def upsample_bilinear(heatmap: Tensor, size: int) -> Tensor:
    """[B, h, w] -> [B, size, size], bilinear with half-pixel centres, rows then columns."""
    _, h, w = heatmap.shape
    y0, y1, fy = _axis_weights(h, size, heatmap.device)
    x0, x1, fx = _axis_weights(w, size, heatmap.device)
    # index_select rather than advanced indexing: same values, several times faster on the CPU.
    rows = heatmap.index_select(1, y0) * (1 - fy)[None, :, None] + heatmap.index_select(1, y1) * fy[None, :, None]
    return rows.index_select(2, x0) * (1 - fx)[None, None, :] + rows.index_select(2, x1) * fx[None, None, :]


def attention_mask(features: Tensor, image_size: int, threshold: float = 0.7) -> Tensor:
    """[B, C, h, w] features -> boolean [B, image_size, image_size] mask (paper Eq. 4)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}; the paper uses 0.7")
    return upsample_bilinear(attention_heatmap(features), image_size) > threshold


# The components' loop ends on a value read back from the device, which no graph can hold: under
# torch.compile the region step from the heatmap to the boxes runs eagerly, as the one graph break
# between the global branch and the crop (the branches themselves compile whole).
_not_compiled = torch.compiler.disable(
    recursive=True, reason="the region step's convergence check reads a flag back from the device"
)

# Rounds of hooking + jumping between two convergence checks (one host sync per check), and
# pointer jumps per round. With 4 jumps a tree of depth <= 16 collapses in one round; deeper ones
# simply finish in a later round. On real 224 px masks (ResNet features, tau 0.7) and random
# masks of density 0.45-0.9, 4 jumps need 3-5 rounds plus the one that confirms the fixed point,
# i.e. one or two checks; more jumps per round did not save rounds, fewer added them.
CHECK_EVERY = 4
JUMPS_PER_ROUND = 4


def _round(labels: Tensor, fg: Tensor, shape: tuple[int, int, int], fdtype: torch.dtype) -> Tensor:
    """One round: hook every tree onto the smallest label its pixels see, then jump pointers."""
    b, h, w = shape
    n = h * w
    grid = labels[:, :n].to(fdtype).reshape(b, 1, h, w)
    seen = (-F.max_pool2d(-grid, kernel_size=3, stride=1, padding=1)).reshape(b, n).to(labels.dtype)
    seen = torch.where(fg, seen, n)
    # Hooking: a pixel that sees a smaller label passes it to its current root, so the
    # whole tree it belongs to adopts it at once (Shiloach-Vishkin style), not pixel by pixel.
    hooked = torch.cat([torch.minimum(labels[:, :n], seen), labels[:, n:]], dim=1)
    hooked.scatter_reduce_(1, labels[:, :n], seen, reduce="amin")
    # Pointer jumping: follow the label's label. A fixed count, no test for roots in between;
    # a pixel already at its root stays there (the root labels itself).
    for _ in range(JUMPS_PER_ROUND):
        hooked = torch.gather(hooked, 1, hooked)
    return hooked


def connected_components(mask: Tensor, check_every: int = CHECK_EVERY) -> Tensor:
    """8-connected labels of a boolean [B, H, W] mask.

    Returns int64 [B, H, W]: each foreground pixel holds the raster index (y * W + x) of its
    component's first pixel; background pixels hold H * W.

    The host reads one flag back every ``check_every`` rounds (whether the block's last round
    changed anything), and nothing else.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    b, h, w = mask.shape
    n = h * w
    # Pooling runs in floating point, which holds pixel indices exactly below 2**24; int32
    # labels halve the memory traffic of the gathers wherever the indices fit.
    fdtype = torch.float32 if n < 2**24 else torch.float64
    ldtype = torch.int32 if n < 2**31 - 1 else torch.int64
    fg = mask.reshape(b, n)
    # Flat labels with a sentinel slot at index n that background pixels point to.
    idx = torch.arange(n + 1, device=mask.device, dtype=ldtype).expand(b, n + 1)
    labels = torch.where(torch.cat([fg, torch.ones_like(fg[:, :1])], dim=1), idx, n)
    while True:
        for _ in range(check_every - 1):
            labels = _round(labels, fg, (b, h, w), fdtype)
        last = _round(labels, fg, (b, h, w), fdtype)
        # The one host sync of the block: a round that changes nothing is the fixed point.
        if not bool((last != labels).any()):
            break
        labels = last
    return last[:, :n].reshape(b, h, w).long()


@_not_compiled
def largest_component_boxes(mask: Tensor, backend: str = "auto") -> Tensor:
    """Bounding box of the largest 8-connected component per image, int64 [B, 4] (x0, y0, x1, y1).

    x1 and y1 are exclusive. Ties go to the component whose first pixel in raster order comes
    first. An empty mask gives the whole image ``(0, 0, W, H)``.

    ``backend``: ``torch`` runs :func:`connected_components` on the mask's device; ``scipy``
    labels the whole batch in one C call (CPU only); ``auto`` picks scipy for CPU tensors, where
    it is several times faster than the tensor algorithm, and torch otherwise. Both give
    identical boxes (tested against scikit-image).
    """
    if backend == "auto":
        backend = "scipy" if mask.device.type == "cpu" else "torch"
    if backend == "scipy":
        return _largest_component_boxes_scipy(mask)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; valid: auto, torch, scipy")
    b, h, w = mask.shape
    n = h * w
    labels = connected_components(mask).reshape(b, n)
    # Component sizes by scatter-add into a row per image: torch.bincount would read the largest
    # label back to the host to size its output (a sync on CUDA), whatever minlength says.
    counts = torch.zeros(b, n + 1, dtype=torch.int32, device=mask.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.int32))
    counts[:, n] = 0  # background
    best = counts.argmax(dim=1)  # first maximum = lowest label
    chosen = (labels == best[:, None]).reshape(b, h, w) & mask
    rows, cols = chosen.any(dim=2), chosen.any(dim=1)
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(dim=1)
    # An empty mask gives the whole image; Python scalars, so nothing is copied from the host.
    empty = ~rows.any(dim=1)
    return torch.stack(
        [x0.masked_fill(empty, 0), y0.masked_fill(empty, 0), x1.masked_fill(empty, w), y1.masked_fill(empty, h)], dim=1
    )


def _largest_component_boxes_scipy(mask: Tensor) -> Tensor:
    """The same boxes from one ``scipy.ndimage.label`` call over the whole [B, H, W] batch.

    The structuring element connects the 8 neighbours within an image and nothing across
    images, so the batch is labelled in one pass; labels grow in raster order within each
    image, which preserves the lowest-label tie-break.
    """
    from scipy import ndimage

    b, h, w = mask.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(mask.cpu().numpy(), structure=structure)
    boxes = np.tile(np.array([0, 0, w, h], dtype=np.int64), (b, 1))
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        slices = ndimage.find_objects(labels)
        image = np.fromiter((sl[0].start for sl in slices), dtype=np.int64, count=count)
        # Per image: largest size first, then lowest label; keep the first row of each image.
        order = np.lexsort((np.arange(count), -sizes, image))
        first = np.r_[True, image[order][1:] != image[order][:-1]]
        for lab in order[first]:
            sl = slices[lab]
            boxes[image[lab]] = (sl[2].start, sl[1].start, sl[2].stop, sl[1].stop)
    return torch.from_numpy(boxes).to(mask.device)


@torch.no_grad()
def attention_boxes(features: Tensor, image_size: int, threshold: float = 0.7) -> Tensor:
    """Attended region of each image as integer pixel boxes.

    ``features``: the global branch's last feature map [B, C, h, w]. Returns int64 [B, 4]
    ``(x0, y0, x1, y1)``, x1/y1 exclusive, in the coordinates of an ``image_size`` x
    ``image_size`` input; the whole image where nothing passes ``threshold``.
    """
    return boxes_from_heatmap(attention_heatmap(features), image_size, threshold)


@_not_compiled
def boxes_from_heatmap(heatmap: Tensor, image_size: int, threshold: float = 0.7) -> Tensor:
    """Steps 2-4 on an already computed [B, h, w] heatmap (the model keeps the heatmap too)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}; the paper uses 0.7")
    return largest_component_boxes(upsample_bilinear(heatmap, image_size) > threshold)


def crop_regions(images: Tensor, boxes: Tensor, box_size: int, out_size: int) -> Tensor:
    """Crop each box from its image and resize it to ``out_size`` x ``out_size`` in one batched op.

    ``boxes`` are pixel boxes on a ``box_size`` grid (the global input); ``images`` may be that
    input or a higher-resolution copy of the same field of view, in which case the boxes are
    scaled by ``images.shape[-1] / box_size``. Normalised images are cropped as they are:
    bilinear sampling commutes with the per-channel affine normalisation, so nothing is undone.
    ``roi_align(aligned=True)`` treats pixel i as covering [i, i+1), matching the exclusive
    boxes; adaptive sampling averages several points per output pixel when shrinking.
    """
    b, _, h, w = images.shape
    if boxes.shape != (b, 4):
        raise ValueError(f"boxes must be [{b}, 4], got {tuple(boxes.shape)}")
    # Scale factors as Python scalars: a tensor built from a list would be a host -> device copy.
    sx, sy = w / box_size, h / box_size
    boxes = boxes.to(images.device)
    rois = torch.stack(
        [torch.arange(b, device=images.device), boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy], dim=1
    ).to(images.dtype)
    return roi_align(images, rois, output_size=(out_size, out_size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
