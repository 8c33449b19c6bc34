"""Image transforms for training and evaluation (paper Sec. 4.2: resize 256, crop 224, flip).

Built on ``torchvision.transforms.v2`` because it works on plain tensors: the same ops run on the
CPU inside DataLoader workers or on a GPU batch, with no PIL round trip and no dictionary-of-keys
machinery (MONAI's dict transforms) for what is one image per sample.

Input: a float tensor ``[1, H, W]`` in [0, 1], bright = dense (what
:func:`agcnn.data.readers.read_image` returns, or a cache entry scaled to [0, 1]).
Output: ``[3, S, S]``, ImageNet-normalised, with ``S = data.highres_size``.

The first step resizes to a *square*, ignoring the aspect ratio. NIH made the ChestX-ray14 PNGs
the same way (originals of 2000-3000 px in varying aspect were stored as 1024 x 1024), it keeps
the whole chest in view (a centre crop of a portrait film would cut the apices or the
costophrenic angles), and it is what the preprocessing cache stores, so cached and uncached
pipelines agree.

High-resolution copy. The local branch of AG-CNN crops the attended region from an image. With
``highres_size == image_size`` that is the image the global branch saw (the paper). With a larger
``highres_size`` every size is scaled by ``highres_size / image_size``: resize to
``round(resize * highres_size / image_size)``, crop ``highres_size`` (:mod:`agcnn.data.geometry`
holds these sizes, and maps boxes between the original image and the model's input). The tensor then covers
exactly the global branch's field of view at higher resolution, and the model downsamples it to
``image_size`` for the global branch. One tensor per sample keeps the random crop and flip
identical for both branches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from agcnn.config import AUGMENTS, check_choice
from agcnn.data.geometry import Geometry

# torchvision's ImageNet statistics: the pretrained backbones expect inputs normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's RandomResizedCrop defaults (area 8-100 %, aspect 3/4-4/3), as in the CheXNet
# training code.
TRAIN_CROP_SCALE = (0.08, 1.0)

# Training augmentations (data.augment, one of agcnn.config.AUGMENTS):
#   paper         resize to `resize`, a random `image_size` crop, horizontal flip (Sec. 4.2):
#                 every training crop is a window of the evaluation image's resize, at its zoom;
#   resized_crop  resize, then RandomResizedCrop keeping `crop_scale` of the area at aspect
#                 3/4-4/3, then flip: stronger zoom augmentation, with the risk that a small
#                 crop cuts a finding out while its label stays on.


def build_transform(
    *,
    train: bool,
    resize: int = 256,
    image_size: int = 224,
    highres_size: int | None = None,
    crop_scale: tuple[float, float] = TRAIN_CROP_SCALE,
    augment: str = "resized_crop",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training or evaluation transform: ``[1, H, W]`` in [0, 1] -> ``[3, S, S]`` normalised.

    ``augment`` (training only) is one of :data:`AUGMENTS`; evaluation always resizes and takes
    the centre crop.
    """
    check_choice("data.augment", augment, AUGMENTS)
    side = image_size if highres_size is None else highres_size
    first = Geometry(resize, image_size, side).first
    ops: list[Callable] = [v2.ToDtype(torch.float32, scale=True), v2.Resize((first, first), antialias=True)]
    if train:
        # Horizontal flip as in the paper, although it mirrors the heart to the right side;
        # the findings themselves are not side-specific labels.
        if augment == "paper":
            ops.append(v2.RandomCrop(side))
        else:
            ops.append(v2.RandomResizedCrop(side, scale=crop_scale, antialias=True))
        ops.append(v2.RandomHorizontalFlip())
    else:
        ops.append(v2.CenterCrop(side))
    # Gray -> 3 identical channels after the geometric steps, so those touch one channel only.
    ops += [v2.RGB(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def transforms_from_config(data_cfg, *, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`build_transform` with every size taken from a :class:`agcnn.config.DataConfig`."""
    scale = tuple(data_cfg.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"data.crop_scale={list(scale)} must be two area fractions 0 < min <= max <= 1, e.g. [0.08, 1.0]")
    return build_transform(
        train=train, resize=data_cfg.resize, image_size=data_cfg.image_size, highres_size=data_cfg.highres_size, crop_scale=scale,
        augment=data_cfg.augment,
    )


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``[..., 3, H, W]`` back to [0, 1] (for pictures only)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
