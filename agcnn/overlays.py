"""Overlay pictures for ``agcnn predict --overlays``: what the model looked at, per image.

Panel 1: the radiograph with the attention heatmap (paper Eq. 3, the map the local branch's
crop is cut from) and the attended box (Sec. 3.2). Panel 2: the class activation map of the
top finding (Zhou et al. 2016: that class's global-branch classifier weights applied to the
global feature map). Both maps cover the field of view the model saw (the centre crop of the
resized image), drawn in the original image's pixel coordinates.

The picture carries no text from the file's header: only the finding and its probability.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_overlay(
    path: str | os.PathLike[str],
    *,
    preview: np.ndarray,
    height: int,
    width: int,
    box: tuple[int, int, int, int],
    field: tuple[int, int, int, int],
    heatmap: np.ndarray,
    cam: np.ndarray,
    finding: str,
    probability: float,
) -> None:
    """Write the two-panel PNG at ``path`` atomically (a kill never leaves half a picture).

    ``preview`` is the original image (uint8, any size, same aspect), ``height`` / ``width`` the
    original pixel size, ``box`` and ``field`` (the model's field of view) boxes in original
    pixels with exclusive ends, ``heatmap`` and ``cam`` [h, w] maps over ``field``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 4.3), dpi=100)
    extent_img = (0, width, height, 0)
    fx0, fy0, fx1, fy1 = field
    extent_map = (fx0, fx1, fy1, fy0)
    cam = np.asarray(cam, dtype=np.float32)
    span = float(cam.max() - cam.min())
    cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    for i, (title, grid, cmap) in enumerate(
        (("attention heatmap and box", heatmap, "jet"), (f"CAM: {finding} ({probability:.2f})", cam, "inferno"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(preview, cmap="gray", vmin=0, vmax=255, extent=extent_img, interpolation="bilinear")
        ax.imshow(grid, cmap=cmap, alpha=0.35, vmin=0, vmax=1, extent=extent_map, interpolation="bilinear")
        if i == 0:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    # No metadata beyond what is drawn: nothing from the DICOM header goes into the PNG.
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)
