"""Where the model's input lies in the original image: the evaluation transform's geometry.

The evaluation transform (:func:`agcnn.data.transforms.build_transform`, and the batch version in
:mod:`agcnn.data.device_transforms`) does three things to an image of ``height x width`` pixels:

1. a square resize to ``first x first``, ``first = round(resize * highres_size / image_size)``
   (:func:`scaled_resize`; the aspect ratio is not kept, see :mod:`agcnn.data.transforms`);
2. a centre crop of ``highres_size`` at torchvision's offset ``round((first - highres_size) / 2)``
   (Python's ``round``: halves go to the even integer, as ``torchvision.transforms.v2.CenterCrop``);
3. the global branch sees that crop at ``image_size`` (the model downsamples it).

:class:`Geometry` is the one place these steps are undone or redone on coordinates: a box of the
original image onto the model's input grid (:meth:`Geometry.to_input`, for ground-truth boxes), a
box of the input grid back to original pixels (:meth:`Geometry.to_original`, for the attended box
of ``predict``), and the part of the original the model sees (:meth:`Geometry.field`).

Coordinates are continuous: pixel ``i`` covers ``[i, i + 1)``, boxes are ``(x0, y0, x1, y1)`` with
x1 / y1 exclusive. Resized pixel ``i`` covers original pixels ``[i * W / first, (i + 1) * W / first)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]


def scaled_resize(resize: int, image_size: int, highres_size: int) -> int:
    """Side of the first (square) resize for a tensor of side ``highres_size``."""
    if highres_size < image_size:
        raise ValueError(f"data.highres_size={highres_size} is smaller than data.image_size={image_size}; use highres_size >= image_size")
    if resize < image_size:
        raise ValueError(f"data.resize={resize} is smaller than data.image_size={image_size}; the crop must fit inside the resized image")
    return int(round(resize * highres_size / image_size))


def centre_offset(size: int, side: int) -> int:
    """torchvision's ``center_crop`` offset of a ``side`` crop of a ``size`` square."""
    return int(round((size - side) / 2.0))


@dataclass(frozen=True)
class Geometry:
    """The evaluation transform's sizes (``data.resize``, ``data.image_size``, ``data.highres_size``)."""

    resize: int
    image_size: int
    highres_size: int

    def __post_init__(self) -> None:
        scaled_resize(self.resize, self.image_size, self.highres_size)  # the sizes' own checks

    @classmethod
    def from_config(cls, cfg) -> "Geometry":
        """From a :class:`agcnn.config.Config` or its :class:`agcnn.config.DataConfig`."""
        data = getattr(cfg, "data", cfg)
        return cls(int(data.resize), int(data.image_size), int(data.highres_size))

    @property
    def first(self) -> int:
        """Side of the square resize."""
        return scaled_resize(self.resize, self.image_size, self.highres_size)

    @property
    def offset(self) -> int:
        """Offset of the centre crop on the resized square (the same on both axes)."""
        return centre_offset(self.first, self.highres_size)

    def as_dict(self) -> dict[str, int]:
        return {"resize": self.resize, "image_size": self.image_size, "highres_size": self.highres_size}

    def to_input(self, box: Sequence[float], *, height: int, width: int) -> Box:
        """A box in original pixels -> the model's input grid (``image_size``), as floats.

        Not clipped: a box partly outside the centre crop reaches below 0 or above ``image_size``.
        """
        first, offset, s = self.first, self.offset, self.image_size / self.highres_size
        x0, y0, x1, y1 = (float(v) for v in box)
        return (
            (x0 * first / width - offset) * s,
            (y0 * first / height - offset) * s,
            (x1 * first / width - offset) * s,
            (y1 * first / height - offset) * s,
        )

    def to_original_float(self, box: Sequence[float], *, height: int, width: int) -> Box:
        """A box on the input grid -> original pixels, exactly (the inverse of :meth:`to_input`)."""
        first, offset, s = self.first, self.offset, self.highres_size / self.image_size
        x0, y0, x1, y1 = (float(v) for v in box)
        return (
            (x0 * s + offset) * width / first,
            (y0 * s + offset) * height / first,
            (x1 * s + offset) * width / first,
            (y1 * s + offset) * height / first,
        )

    def to_original(self, box: Sequence[float], *, height: int, width: int) -> tuple[int, int, int, int]:
        """A box on the input grid -> whole original pixels that cover it.

        Widened to whole pixels (floor / ceil), x1 / y1 exclusive, clipped to the image, at least
        one pixel wide and high.
        """
        fx0, fy0, fx1, fy1 = self.to_original_float(box, height=height, width=width)
        # A small tolerance so that exact integers are not pushed out by float rounding.
        ox0 = max(0, math.floor(fx0 + 1e-6))
        oy0 = max(0, math.floor(fy0 + 1e-6))
        ox1 = min(width, math.ceil(fx1 - 1e-6))
        oy1 = min(height, math.ceil(fy1 - 1e-6))
        return ox0, oy0, max(ox1, ox0 + 1), max(oy1, oy0 + 1)

    def field(self, *, height: int, width: int) -> tuple[int, int, int, int]:
        """The part of the original image the model sees (the centre crop), in whole pixels."""
        return self.to_original((0, 0, self.image_size, self.image_size), height=height, width=width)
