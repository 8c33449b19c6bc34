"""Overlay pictures for ``agcnn predict --overlays``: where each finding was read, per image.

Panel 1: the radiograph with the attention heatmap (paper Eq. 3, the map the local branch's
crop is cut from) and the attended box (Sec. 3.2). Then one panel per explained finding: the
fusion head's class activation map (:mod:`agcnn.explain`: both halves of the fusion head, the
global one over the whole field of view and the local one over the attended box), titled with
the finding and its probability. Which findings: those called positive at the checkpoint's
operating points, or the top ``k`` by probability (:func:`choose_findings`).

All finding panels share one colour scale, from 0 to the largest value on any of them, with a
colour bar, so a weak map looks weak next to a strong one. Only positive evidence is coloured;
the rest of the radiograph stays as it is. A map with no positive value says so in the panel
("no positive evidence"), and a picture where no finding is called positive says that instead
of showing a map. Maps cover the field of view the model saw (the centre crop of the resized
image), drawn in the original image's pixel coordinates.

The picture carries no text from the file's header: only findings and probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# More panels than this make a picture too small to read; the title says how many were left out.
MAX_PANELS = 6
DEFAULT_TOP = 3


@dataclass
class FindingMap:
    """One finding's panel: its name, probability, and its map over the field of view [h, w]."""

    finding: str
    probability: float
    cam: np.ndarray


def choose_findings(probs: np.ndarray, thresholds: Sequence[float | None] | None, top: int | None,
                    max_panels: int = MAX_PANELS) -> tuple[list[list[int]], list[int]]:
    """Which findings each image's overlay explains: ``(indices per image, how many left out)``.

    ``top`` > 0: the ``top`` most probable findings. Otherwise the findings called positive at
    ``thresholds`` (probability >= threshold; None / NaN never calls), most probable first, at
    most ``max_panels``; with no thresholds at all, the ``DEFAULT_TOP`` most probable.
    """
    probs = np.asarray(probs, dtype=float)
    order = np.argsort(-probs, axis=1, kind="stable")
    if top is not None and top < 0:
        raise ValueError(f"overlay top {top} must be 0 (the findings called positive) or more")
    if top or thresholds is None:
        k = min(top or DEFAULT_TOP, probs.shape[1], max_panels)
        return [row[:k].tolist() for row in order], [0] * len(probs)
    thr = np.array([np.nan if t is None else float(t) for t in thresholds])
    chosen, left = [], []
    for p, row in zip(probs, order):
        called = [int(j) for j in row if not np.isnan(thr[j]) and p[j] >= thr[j]]
        chosen.append(called[:max_panels])
        left.append(max(0, len(called) - max_panels))
    return chosen, left


def write_overlay(path: str | os.PathLike[str], **kwargs) -> None:
    """Write :func:`overlay_figure` as a PNG at ``path`` atomically (a kill never leaves half a picture)."""
    from agcnn.fileio import atomic_write

    fig = overlay_figure(**kwargs)
    with atomic_write(path) as f:
        # No metadata beyond what is drawn: nothing from the DICOM header goes into the PNG.
        fig.savefig(f, format="png", metadata={"Software": None})


def overlay_figure(
    *,
    preview: np.ndarray,
    height: int,
    width: int,
    box: tuple[int, int, int, int],
    field: tuple[int, int, int, int],
    heatmap: np.ndarray,
    findings: Sequence[FindingMap],
    left_out: int = 0,
    empty_note: str = "no finding called positive",
    map_name: str = "fusion CAM",
):
    """The overlay as a matplotlib ``Figure`` (not attached to any GUI backend).

    ``preview`` is the original image (uint8, any size, same aspect), ``height`` / ``width`` the
    original pixel size, ``box`` and ``field`` (the model's field of view) boxes in original
    pixels with exclusive ends, ``heatmap`` [h, w] over ``field``, ``findings`` the panels to draw
    (none: one panel saying ``empty_note``).
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = 1 + max(1, len(findings))
    fig = Figure(figsize=(3.3 * n + 0.6, 3.9), dpi=100)
    extent_img = (0, width, height, 0)
    fx0, fy0, fx1, fy1 = field
    extent_map = (fx0, fx1, fy1, fy0)
    x0, y0, x1, y1 = box
    cams = [np.maximum(np.asarray(f.cam, dtype=np.float32), 0) for f in findings]
    vmax = max([float(c.max()) for c in cams] + [0.0])
    norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    cmap = colormaps["inferno"]
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]

    def base(ax, title: str) -> None:
        ax.imshow(preview, cmap="gray", vmin=0, vmax=255, extent=extent_img, interpolation="bilinear")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()

    def note(ax, text: str) -> None:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="white",
                bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none", "pad": 4})

    base(axes[0], "attention heatmap and box")
    axes[0].imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1, extent=extent_map, interpolation="bilinear")
    axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
    if not findings:
        base(axes[1], map_name)
        note(axes[1], empty_note)
    for ax, f, cam in zip(axes[1:], findings, cams):
        base(ax, f"{f.finding} ({f.probability:.2f})")
        if cam.max() > 0:
            # Only positive evidence is coloured: the radiograph shows through everywhere else.
            ax.imshow(np.ma.masked_less_equal(cam, 0), cmap=cmap, norm=norm, alpha=0.55, extent=extent_map,
                      interpolation="bilinear")
        else:
            note(ax, "no positive evidence")
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=0.8, linestyle="--"))
    if findings:
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[1:], fraction=0.03, pad=0.02)
        bar.set_label(f"{map_name} (logit units, one scale for all panels)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    if left_out:
        fig.suptitle(f"{left_out} more findings called positive are not shown", fontsize=8)
    return fig
