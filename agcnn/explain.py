"""Class activation maps for every branch of AG-CNN, per finding, in the global input's pixels.

A branch ends in pool5 -> linear classifier. Its class activation map (CAM; Zhou et al. 2016,
Eq. 2) for finding ``k`` is the classifier's row ``w_k`` applied at every position of the last
feature map ``f`` [C, h, w]: ``M_k(y, x) = sum_c w_kc f_c(y, x)``.

- **Global branch**: ``M_k`` on the global feature map, upsampled to the ``image_size`` grid.
- **Local branch**: ``M_k`` on the local feature map, which covers only the attended crop; it is
  pasted back into the crop's box on the ``image_size`` grid and is zero outside it.
- **Fusion head** (paper Sec. 3.4): its weight matrix is ``[W_g | W_l]`` over the concatenated
  pool5 vectors. ``W_g`` is applied to the global map and ``W_l`` to the local one, each in the
  image's coordinates, and the two are summed. The local half is scaled by ``S^2 / area(box)``
  (``S = image_size``) so that the mean of the summed map over the field of view is the sum of
  the two halves' contributions to the logit, the same way as for the branch maps.

Where this is exact. With average pooling (``model.pool: avg``) the logit is linear in the
spatial mean: ``logit_k = mean_yx M_k(y, x) + b_k`` for each branch, and
``logit_k = mean(M^g_k) + mean(M^l_k) + b_k`` for the fusion head, on the native feature grids
(tested to float precision). The map then splits the logit exactly into per-position shares.
With max pooling (the paper's pool5, Sec. 3.1) each channel contributes only its maximum, which
may sit at a different position for every channel, so ``M_k`` shows where the weighted channels
are active, not how the logit was formed: an approximation, usually good for a single compact
finding and poorer when channels peak in different places. Resampling to image coordinates
(bilinear) keeps these means only approximately.

Grad-CAM (Selvaraju et al. 2017) from ``monai.visualize`` is the alternative ``method``. For a
linear head after a global pool the Grad-CAM weights are ``w_kc / (h w)`` (average pooling, and
max pooling with a unique maximum per channel), so Grad-CAM equals ``relu(M_k) / (h w)``; the
maps here are multiplied back by ``h w`` so that both methods share units. The fusion Grad-CAM
applies the ReLU to each half before summing, where CAM sums first.

Everything runs on the model's device; maps for the whole batch and every requested finding
come from one einsum per feature map.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agcnn.config import EXPLAIN_METHODS, check_choice
from agcnn.models.roi import largest_component_boxes, upsample_bilinear
from agcnn.stages import BRANCHES

__all__ = [
    "Explanation",
    "cam_boxes",
    "cam_from_features",
    "check_classes",
    "explain",
    "feature_maps",
    "paste_into_boxes",
]


@dataclass
class Explanation:
    """Maps of one batch. ``S`` is the model's ``image_size``; boxes are on that grid.

    ``classes`` [B, k]: the finding index of each map. ``maps[branch]`` [B, k, S, S] float32.
    ``native``: the maps on their own feature grids before resampling:
    ``global`` [B, k, h, w], ``local`` [B, k, h', w'], ``fusion_global`` and ``fusion_local``.
    ``logits``: ``{branch: [B, K]}``; ``boxes`` [B, 4] the attended boxes (x1/y1 exclusive);
    ``heatmap`` [B, h, w] the attention heatmap (Eq. 3).
    """

    classes: Tensor
    maps: dict[str, Tensor]
    logits: dict[str, Tensor]
    boxes: Tensor
    heatmap: Tensor
    method: str = "cam"
    native: dict[str, Tensor] = field(default_factory=dict)


def check_classes(classes: Tensor | None, batch: int, num_classes: int, device: torch.device) -> Tensor:
    if classes is None:
        return torch.arange(num_classes, device=device).expand(batch, num_classes)
    classes = torch.as_tensor(classes, device=device).long()
    if classes.dim() == 1:
        classes = classes[:, None]
    if classes.dim() != 2 or classes.shape[0] != batch:
        raise ValueError(f"classes must be [B, k] finding indices with B = {batch}, got shape {tuple(classes.shape)}")
    if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"classes must be finding indices in [0, {num_classes}), got values {classes.unique().tolist()}")
    return classes


def paste_into_boxes(maps: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Paste crop-grid maps [B, k, h, w] into their boxes on a ``size`` x ``size`` grid.

    The inverse of :func:`agcnn.models.roi.crop_regions`: pixel ``(y, x)`` of the output, with
    centre ``(y + 0.5, x + 0.5)``, lies inside box ``(x0, y0, x1, y1)`` when ``x0 <= x + 0.5 < x1``
    (likewise for y) and samples the map bilinearly where the crop put that point; outside every
    box it is 0. One ``grid_sample`` for the batch.
    """
    b, k, _, _ = maps.shape
    if boxes.shape != (b, 4):
        raise ValueError(f"boxes must be [{b}, 4], got {tuple(boxes.shape)}")
    centres = torch.arange(size, device=maps.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.to(device=maps.device, dtype=torch.float32).unbind(1)
    # Box edges map to -1 / +1: the outer edges of the map's first and last cells (align_corners=False).
    u = (centres[None, :] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
    v = (centres[None, :] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)
    pasted = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((u >= -1) & (u < 1))[:, None, :] & ((v >= -1) & (v < 1))[:, :, None]
    return pasted * inside[:, None]


def _upsample(maps: Tensor, size: int) -> Tensor:
    """[B, k, h, w] -> [B, k, size, size] with the region step's bilinear upsampling."""
    b, k, h, w = maps.shape
    return upsample_bilinear(maps.float().reshape(b * k, h, w), size).reshape(b, k, size, size)


def _fusion_in_image(model: nn.Module, g_part: Tensor, l_part: Tensor, boxes: Tensor) -> Tensor:
    """Sum the fusion head's two halves in image coordinates, local half scaled by S^2 / box area."""
    s = model.image_size
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(device=l_part.device, dtype=torch.float32)
    return g_part + l_part * (s * s / area.clamp(min=1))[:, None, None, None]


@contextmanager
def feature_maps(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward of ``model`` leaves its two last feature maps in the
    yielded dict (``global``, ``local``), so maps need no second forward pass."""
    feats: dict[str, Tensor] = {}
    hooks = [
        model.global_branch.features.register_forward_hook(lambda m, i, o: feats.__setitem__("global", o)),
        model.local_branch.features.register_forward_hook(lambda m, i, o: feats.__setitem__("local", o)),
    ]
    try:
        yield feats
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def cam_from_features(model: nn.Module, out, feats: dict[str, Tensor], classes: Tensor) -> Explanation:
    """CAM of every branch from a forward pass already made (``out``, and ``feats`` from
    :func:`feature_maps`) for the findings ``classes`` [B, k]."""
    g_map, l_map = feats["global"], feats["local"]
    b, k = classes.shape
    n_g = model.global_branch.num_features
    w_fusion = model.fusion.weight.float()
    # Each feature map meets every classifier that reads it in one einsum: the branch's own
    # classifier and its half of the fusion head, for every requested finding of every image.
    w_on_g = torch.cat([model.global_branch.classifier.weight.float()[classes], w_fusion[:, :n_g][classes]], dim=1)
    w_on_l = torch.cat([model.local_branch.classifier.weight.float()[classes], w_fusion[:, n_g:][classes]], dim=1)
    on_g = torch.einsum("bkc,bchw->bkhw", w_on_g, g_map.float())
    on_l = torch.einsum("bkc,bchw->bkhw", w_on_l, l_map.float())
    native = {"global": on_g[:, :k], "fusion_global": on_g[:, k:], "local": on_l[:, :k], "fusion_local": on_l[:, k:]}
    s = model.image_size
    g_img = _upsample(on_g, s)
    l_img = paste_into_boxes(on_l, out.boxes, s)
    maps = {
        "global": g_img[:, :k],
        "local": l_img[:, :k],
        "fusion": _fusion_in_image(model, g_img[:, k:], l_img[:, k:], out.boxes),
    }
    return Explanation(classes=classes, maps=maps, logits=_logits(out), boxes=out.boxes, heatmap=out.heatmap,
                       method="cam", native=native)


@torch.no_grad()
def _cam(model: nn.Module, x: Tensor, classes: Tensor) -> Explanation:
    with feature_maps(model) as feats:
        out = model(x, stage="fusion")
    return cam_from_features(model, out, feats, classes)


def _logits(out) -> dict[str, Tensor]:
    return {"global": out.global_logits.float(), "local": out.local_logits.float(), "fusion": out.fusion_logits.float()}


class _Tapped(nn.Module):
    """The model with its two last feature maps routed through identity taps, whose hooks
    ``monai.visualize`` may own: MONAI never removes the hooks it registers, so they go on these
    throw-away modules rather than on the model. Returns one branch's logits."""

    def __init__(self, model: nn.Module, branch: str) -> None:
        super().__init__()
        self.model, self.branch = model, branch
        self.global_tap, self.local_tap = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        handles = [
            self.model.global_branch.features.register_forward_hook(lambda m, i, o: self.global_tap(o)),
            self.model.local_branch.features.register_forward_hook(lambda m, i, o: self.local_tap(o)),
        ]
        try:
            return self.model(x, stage="fusion").logits(self.branch).float()
        finally:
            for h in handles:
                h.remove()


def _gradcam(model: nn.Module, x: Tensor, classes: Tensor, out=None, branches: tuple[str, ...] = BRANCHES) -> Explanation:
    from monai.visualize import GradCAM

    if out is None:
        with torch.no_grad():
            out = model(x, stage="fusion")
    (b, k), s = classes.shape, model.image_size
    maps = {br: torch.zeros(b, k, s, s, device=x.device) for br in branches}
    native: dict[str, Tensor] = {}
    with torch.inference_mode(False), torch.enable_grad():
        # Gradients must reach the taps even when every parameter is frozen; the copy is made
        # here so that it is an ordinary tensor even when the caller runs in inference mode.
        xg = x.detach().clone().requires_grad_(True)
        for branch in branches:
            layers = {"global": ["global_tap"], "local": ["local_tap"], "fusion": ["global_tap", "local_tap"]}[branch]
            # MONAI switches its module to eval() and back to *its* previous mode afterwards: the
            # wrapper must carry the model's mode, or a fresh (training-mode) wrapper would
            # leave the model in training mode.
            cam = GradCAM(nn_module=_Tapped(model, branch).train(model.training), target_layers=layers)
            for c in classes.unique().tolist():
                rows = classes == c  # [B, k]
                parts = []
                for i, layer in enumerate(layers):
                    m = cam.compute_map(xg, class_idx=int(c), layer_idx=i).detach().float()
                    m = m * (m.shape[-1] * m.shape[-2])  # Grad-CAM's 1 / (h w) undone: CAM units
                    key = branch if branch != "fusion" else f"fusion_{layer[:-4]}"
                    if key not in native:
                        native[key] = torch.zeros(b, k, *m.shape[-2:], device=x.device)
                    native[key] = torch.where(rows[:, :, None, None], m, native[key])
                    parts.append(_upsample(m, s) if layer == "global_tap" else paste_into_boxes(m, out.boxes, s))
                if branch == "fusion":
                    full = _fusion_in_image(model, parts[0], parts[1], out.boxes)[:, 0]
                else:
                    full = parts[0][:, 0]
                maps[branch] = torch.where(rows[:, :, None, None], full[:, None], maps[branch])
    return Explanation(classes=classes, maps=maps, logits=_logits(out), boxes=out.boxes, heatmap=out.heatmap,
                       method="gradcam", native=native)


def explain(model: nn.Module, x: Tensor, classes: Tensor | None = None, method: str = "cam", *, out=None,
            branches: tuple[str, ...] = BRANCHES) -> Explanation:
    """Per-finding maps of every branch for the normalised image batch ``x`` [B, 3, S', S'].

    ``classes`` [B, k] (or [B]) picks the findings to map for each image; ``None`` maps all.
    ``method``: ``cam`` (exact with average pooling, see the module docstring) or ``gradcam``
    (``monai.visualize.GradCAM``, one backward pass per distinct finding and branch).
    The model is used as it is (call ``.eval()`` first); ``x`` must be on its device. Grad-CAM
    may be given the forward pass already made on ``x`` as ``out``; CAM from a forward pass
    already made is :func:`cam_from_features`. ``branches`` limits Grad-CAM's backward passes to
    the maps needed (CAM computes all three from the same two einsums).
    """
    check_choice("explanation method", method, EXPLAIN_METHODS)
    for branch in branches:
        check_choice("branch", branch, BRANCHES)
    classes = check_classes(classes, x.shape[0], model.num_classes, x.device)
    return _cam(model, x, classes) if method == "cam" else _gradcam(model, x, classes, out, tuple(branches))


def cam_boxes(maps: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Boxes of the largest region of each map's positive evidence: ``(boxes [.., 4], empty [..])``.

    Each map is ReLU'd and divided by its maximum, thresholded at ``threshold`` and passed to
    the region step's largest-component box (:mod:`agcnn.models.roi`). ``0.5`` is the half-maximum
    contour: on a map that is 1 on a grid-aligned block and 0 elsewhere, bilinear upsampling
    crosses 0.5 exactly at the block's edges, so the box is recovered to the pixel. A map with
    no positive value has no region: its box is the whole image and ``empty`` is True.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"CAM threshold must be in [0, 1), got {threshold}; 0.5 is the half-maximum contour")
    *lead, h, w = maps.shape
    flat = maps.float().reshape(-1, h, w).relu()
    peak = flat.amax(dim=(1, 2))
    empty = peak <= 0
    norm = flat / torch.where(empty, torch.ones_like(peak), peak)[:, None, None]
    boxes = largest_component_boxes(norm > threshold)
    return boxes.reshape(*lead, 4), empty.reshape(lead)
