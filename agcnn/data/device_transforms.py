"""The training and evaluation transforms of :mod:`agcnn.data.transforms`, on a whole batch on the device.

A GPU consumes 1-2 thousand images per second; resizing and cropping them in float32 in the
DataLoader's worker processes costs about 1.7 ms of CPU per image (``docs/benchmarks.md``), i.e.
a few cores per GPU for the transforms alone. Here the loader only decodes (or reads the
``agcnn prepare`` cache) and collates integer squares, ``[B, 1, C, C]`` uint8 with
``C = data.cache_size``; one :class:`DeviceTransform` call then does, on the device the model
runs on:

1. integer grey levels -> float32 in [0, 1] (what the cache's reader returns on the CPU);
2. the square resize to ``Geometry.first`` (:mod:`agcnn.data.geometry`) -- the same
   ``F.interpolate(bilinear, antialias=True)`` the CPU transform calls, on the batch at once;
3. training: a random crop per image, drawn exactly as torchvision draws it -- ``paper``:
   ``RandomCrop(side)``; ``resized_crop``: ``RandomResizedCrop(side, scale=data.crop_scale)``
   (area fraction uniform in ``crop_scale``, log aspect ratio uniform in [3/4, 4/3], 10 tries,
   then the centre crop) -- and a horizontal flip with probability 1/2; evaluation: the centre
   crop;
4. grey -> 3 channels, ImageNet normalisation.

The crops of the batch are one ``torchvision.ops.roi_align`` (``aligned=True``). A crop of
exactly ``side`` pixels (``paper``, evaluation) samples every pixel at its centre, so it equals
the CPU crop bit for bit; a ``resized_crop`` crop that is resized averages ``ceil(crop / side)``
bilinear samples per output pixel where torchvision applies an antialiasing triangle filter:
the same geometry, values within a few grey levels (``tests/data/test_device_transforms.py``).

The random draws come from the transform's own CPU generator (:meth:`DeviceTransform.reseed`
per epoch), so they do not depend on the number of loader workers, and workers hold no random
state at all: they can stay alive from one epoch to the next. The host never waits for the
device: the per-image parameters travel in one small copy from pinned memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from agcnn.config import AUGMENTS
from agcnn.data.geometry import Geometry
from agcnn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TRAIN_CROP_SCALE

# torchvision's RandomResizedCrop aspect-ratio range and number of tries.
RATIO = (3 / 4, 4 / 3)
TRIES = 10


def random_crop_params(n: int, size: int, side: int, generator: torch.Generator) -> Tensor:
    """``RandomCrop(side)`` on a ``size`` square for ``n`` images: int64 ``[n, 4]`` (top, left, h, w)."""
    if side > size:
        raise ValueError(f"crop side {side} is larger than the image ({size}); data.resize must be at least data.image_size")
    top = torch.randint(0, size - side + 1, (n,), generator=generator)
    left = torch.randint(0, size - side + 1, (n,), generator=generator)
    return torch.stack([top, left, torch.full_like(top, side), torch.full_like(top, side)], dim=1)


def resized_crop_params(n: int, size: int, scale: tuple[float, float], generator: torch.Generator,
                        ratio: tuple[float, float] = RATIO) -> Tensor:
    """``RandomResizedCrop.get_params`` on a ``size`` square for ``n`` images, all tries at once.

    Same distribution as torchvision's loop: per try an area fraction uniform in ``scale`` and a
    log aspect ratio uniform in ``log(ratio)``, width and height rounded half to even; the first
    try that fits is used, a uniform position inside the image; when none of the 10 fits, the
    whole square (the centre crop of an image whose aspect lies inside ``ratio``).
    Returns int64 ``[n, 4]`` (top, left, height, width).
    """
    area = float(size * size)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, TRIES, generator=generator, dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, TRIES, generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.long().argmax(dim=1, keepdim=True)  # first try that fits (0 where none does)
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w.gather(1, first)[:, 0], size)
    h = torch.where(any_fit, h.gather(1, first)[:, 0], size)
    # Uniform integer positions, as torch.randint(0, size - h + 1) gives.
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(any_fit, (u[:, 0] * (size - h + 1)).floor().long().clamp(max=size - h), 0)
    left = torch.where(any_fit, (u[:, 1] * (size - w + 1)).floor().long().clamp(max=size - w), 0)
    return torch.stack([top, left, h, w], dim=1)


class DeviceTransform(nn.Module):
    """``[B, 1, C, C]`` integer grey levels on any device -> ``[B, 3, S, S]`` normalised float32.

    Same arguments as :func:`agcnn.data.transforms.build_transform`; ``train=False`` is the
    evaluation transform (resize, centre crop), which draws nothing.
    """

    def __init__(self, *, train: bool, resize: int = 256, image_size: int = 224, highres_size: int | None = None,
                 crop_scale: tuple[float, float] = TRAIN_CROP_SCALE, augment: str = "resized_crop", seed: int = 0):
        super().__init__()
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment={augment!r} is not known; valid: {', '.join(AUGMENTS)}")
        self.train_mode, self.augment = train, augment
        self.side = image_size if highres_size is None else highres_size
        self.geometry = Geometry(resize, image_size, self.side)
        self.first = self.geometry.first
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        # Created once, moved with the module: no host -> device copy per batch.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, data_cfg, *, train: bool, seed: int = 0) -> "DeviceTransform":
        return cls(train=train, resize=data_cfg.resize, image_size=data_cfg.image_size, highres_size=data_cfg.highres_size,
                   crop_scale=tuple(data_cfg.crop_scale), augment=getattr(data_cfg, "augment", "resized_crop"), seed=seed)

    def reseed(self, seed: int) -> None:
        """Start the random draws afresh (per epoch, so a resumed run draws what it would have)."""
        self.generator.manual_seed(seed)

    def draw(self, n: int) -> tuple[Tensor, Tensor]:
        """This many images' crop boxes (top, left, height, width on the resized square) and flips."""
        if not self.train_mode:
            off = self.geometry.offset  # torchvision's CenterCrop offset
            box = torch.tensor([off, off, self.side, self.side]).expand(n, 4)
            return box, torch.zeros(n, dtype=torch.bool)
        if self.augment == "paper":
            box = random_crop_params(n, self.first, self.side, self.generator)
        else:
            box = resized_crop_params(n, self.first, self.crop_scale, self.generator)
        return box, torch.rand(n, generator=self.generator) < 0.5

    def forward(self, images: Tensor, params: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected a [B, 1, C, C] batch of grey squares, got shape {tuple(images.shape)}")
        if images.is_floating_point():
            raise ValueError(f"expected integer grey levels (uint8 or uint16 as stored by agcnn prepare), got {images.dtype}")
        b, device = images.shape[0], images.device
        box, flip = self.draw(b) if params is None else params
        # One small host -> device copy per batch: batch index, box corners, flip flag.
        top, left, h, w = box.double().unbind(1)
        rois = torch.stack([torch.arange(b, dtype=torch.float64), left, top, left + w, top + h, flip.double()], dim=1).float()
        if device.type == "cuda":
            rois = rois.pin_memory().to(device, non_blocking=True)
        else:
            rois = rois.to(device)
        with torch.autocast(device.type, enabled=False):  # float32 whatever the caller's autocast
            return self._transform(images, rois)

    def _transform(self, images: Tensor, rois: Tensor) -> Tensor:
        b = images.shape[0]
        top_value = 255.0 if images.dtype == torch.uint8 else float(torch.iinfo(images.dtype).max)
        x = images.float() / top_value
        if x.shape[-1] != self.first:
            x = F.interpolate(x, size=(self.first, self.first), mode="bilinear", antialias=True, align_corners=False)
        x = roi_align(x, rois[:, :5], output_size=(self.side, self.side), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        x = torch.where(rois[:, 5].bool().view(b, 1, 1, 1), x.flip(-1), x)
        return ((x - self.mean) / self.std).contiguous()
