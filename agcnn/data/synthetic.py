"""Generated chest-radiograph phantoms with planted findings: the built-in data set.

Each phantom is a frontal chest "radiograph" built from smooth shapes (bright = dense): a body
outline, two dark lung fields with vessel-like texture, a bright mediastinum, spine and heart,
posterior and anterior ribs as curved bands, clavicles, blur and quantum noise. Findings are
planted at random places, each with its bounding box:

=============  =====================================================================
Nodule         small round opacity, 3-5 % of the image width, with a spiculated margin
Mass           larger lobulated opacity, 6-10 % of the width
Pneumothorax   apical-lateral rim without lung markings, with a thin pleural line
Effusion       fluid level blunting the costophrenic angle, meniscus rising laterally
Cardiomegaly   heart enlarged by 30-45 % (cardiothoracic ratio above 0.5)
=============  =====================================================================

The other nine labels are 0: they are truly absent, not unknown. About 25 % of the images have
no finding; some patients have two images (a follow-up with the same anatomy).

**Small findings and their look-alikes.** The situation AG-CNN exists for (paper Sec. 3.2) is a
small finding that the downsampled whole film shows but cannot identify. A 14-21 mm nodule on a
43 cm film is 4-6 px at 128 px: visibly *something*, but real films are full of small round
opacities that are not nodules -- vessels seen end-on, calcified granulomas, nipple shadows --
and what tells them apart is detail a few pixels wide at full resolution. The phantoms model
exactly that. About 80 % of the films carry one small round opacity (at most one, so that the
single attended box of AG-CNN can hold it): a **nodule** (50 % of films, label Nodule = 1), a
**calcified granuloma** (15 %) or an **end-on vessel** (15 %), both label 0. All three are the
same sphere -- same size range, same contrast, same place distribution -- plus a fine pattern
of their own: spicules radiating from the nodule's margin, a ring of dense popcorn clumps inside
the granuloma, nothing in the vessel. The patterns are angular harmonics of order 6 and above
with zero integrated density and second moment, rendered with 4 x 4 samples per pixel, so they
hold no low spatial frequencies: after the 4x downsampling of a 512 px film to 128 px the kinds
differ by under 3 % of the opacity's contrast (below the quantum noise), while at 512 px they
differ by a fifth of it or more (``tests/data/test_synthetic.py`` measures both, and checks
that grey-level statistics of the whole film cannot tell a nodule film from a look-alike film).
Nothing else marks the label: the file format is assigned by image number, the prevalences are
independent of everything else. Look-alikes are listed in ``lookalikes.csv`` (path, kind, box).

Everything is deterministic in ``seed``: patient ``p`` draws from ``default_rng([seed, p])``, so
the images do not depend on the number of worker processes. Images are written as 16-bit PNG and,
for a ``dicom_fraction`` of them, as DICOM (some MONOCHROME1, some RLE Lossless or JPEG 2000
compressed), to exercise the readers. ``labels.csv`` (path, patient, split, view and the 14 label
columns), ``boxes.csv`` (path, label, x0, y0, x1, y1 in pixels), ``lookalikes.csv`` and ``phantoms.json``
describe the set.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agcnn.errors import ConfigError, DataError
from agcnn.fileio import atomic_write
from agcnn.labels import LABELS

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first runs are not guarded there
    fcntl = None

log = logging.getLogger(__name__)

FINDINGS = ("Nodule", "Mass", "Pneumothorax", "Effusion", "Cardiomegaly")
# Independent draws; P(no finding) = 0.50 * 0.85 * 0.85 * 0.82 * 0.85 = 0.25.
PREVALENCE = {"Nodule": 0.50, "Mass": 0.15, "Pneumothorax": 0.15, "Effusion": 0.18, "Cardiomegaly": 0.15}
FORMAT_VERSION = 4  # 4: exposure scaled where no finding is drawn (tests/data/test_phantom_evidence.py)
# Stored grey levels: 12 bits, as most digital radiography detectors deliver.
BITS = 12


@dataclass
class Anatomy:
    """One patient's body habitus; follow-up images reuse it with small changes."""

    cx: float  # midline
    body: float  # half-width of the torso
    top: float  # lung apex
    bottom: float  # dome of the diaphragm at the costophrenic angles
    lung_w: float  # half-width of each lung
    lung_gap: float  # distance from midline to each lung's centre
    heart_x: float
    heart_y: float
    heart_rx: float
    heart_ry: float
    rib_phase: float
    gamma: float
    tissue: float


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    top = rng.uniform(0.13, 0.19)
    return Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        body=rng.uniform(0.40, 0.46),
        top=top,
        bottom=top + rng.uniform(0.56, 0.64),
        lung_w=rng.uniform(0.135, 0.16),
        lung_gap=rng.uniform(0.18, 0.205),
        heart_x=rng.uniform(0.03, 0.06),
        heart_y=rng.uniform(0.60, 0.66),
        heart_rx=rng.uniform(0.105, 0.125),
        heart_ry=rng.uniform(0.085, 0.10),
        rib_phase=rng.uniform(-0.01, 0.01),
        gamma=rng.uniform(0.85, 1.2),
        tissue=rng.uniform(0.5, 0.6),
    )


def _sig(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 to 1 over about ``width``: smooth organ edges, no aliasing."""
    return 0.5 * (1.0 + np.tanh(x / width))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    import cv2

    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _lung(u: np.ndarray, v: np.ndarray, a: Anatomy, side: int, edge: float) -> np.ndarray:
    """Soft mask of one lung (side -1: image left, +1: image right) at coordinates (u, v) in [0, 1]."""
    lx = a.cx + side * a.lung_gap
    t = np.clip((v - a.top) / (a.bottom - a.top), 0.0, 1.0)
    # Narrow apex, widest above the diaphragm.
    half = a.lung_w * (0.30 + 0.70 * t**0.35)
    dx = (u - lx) / half
    lateral = dx * side  # > 0 towards the chest wall
    # Rounded apex, its top nearer the midline.
    v_top = a.top + 0.05 * (dx + 0.35 * side) ** 2
    # Diaphragm dome: highest mid-lung, deepest at the lateral costophrenic angle; the right
    # hemidiaphragm (image left) sits a little higher.
    v_bot = a.bottom - 0.085 * (1.0 - np.clip(lateral, -1, 1) ** 2) - 0.03 * np.clip(-lateral, 0, 1) - 0.015 * (side < 0)
    return _sig(v - v_top, edge) * _sig(v_bot - v, edge) * _sig(1.0 - np.abs(dx), edge / a.lung_w)


def _box(mask: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask > threshold)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _pick_in_lung(rng: np.random.Generator, lungs: np.ndarray, margin_px: float) -> tuple[int, int]:
    """A random point well inside a lung: the mask is ~1 at the point and a margin around it."""
    size = lungs.shape[0]
    m = max(1, int(round(margin_px)))
    for _ in range(200):
        x, y = rng.integers(m, size - m, size=2)
        if min(lungs[y, x], lungs[y - m, x], lungs[y + m - 1, x], lungs[y, x - m], lungs[y, x + m - 1]) > 0.9:
            return int(x), int(y)
    ys, xs = np.nonzero(lungs > 0.9)
    i = rng.integers(len(xs))
    return int(xs[i]), int(ys[i])


def _blob(d: np.ndarray, y: int, x: int, r: float, contrast: float, rng: np.random.Generator, lobes: float = 0.0) -> tuple[int, int, int, int]:
    """Add a round (optionally lobulated) opacity to ``d`` in place; returns its box."""
    size = d.shape[0]
    R = int(np.ceil(r * (1 + lobes) + 2))
    y0, y1, x0, x1 = max(0, y - R), min(size, y + R + 1), max(0, x - R), min(size, x + R + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.hypot(yy - y, xx - x)
    radius = np.full_like(dist, r)
    if lobes:
        theta = np.arctan2(yy - y, xx - x)
        p1, p2 = rng.uniform(0, 2 * np.pi, 2)
        radius = r * (1 + lobes * np.sin(3 * theta + p1) + 0.5 * lobes * np.sin(5 * theta + p2))
    # Projection of a solid sphere (thickest in the middle), with a half-pixel soft edge.
    profile = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0)) + 0.3 * _sig(radius - dist, 0.7) * (dist < radius + 2)
    d[y0:y1, x0:x1] += contrast * np.clip(profile, 0, 1.2)
    inside = dist <= radius
    ys, xs = np.nonzero(inside)
    return int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max()) + 1, int(y0 + ys.max()) + 1


# Small round opacities. Each kind is the same smooth sphere (what the downsampled whole film
# shows) plus a fine pattern of its own, a few pixels across at the full size:
#   nodule     spiculated margin: thin dense strands radiating from the surface (corona radiata)
#   granuloma  popcorn calcification: a ring of dense clumps inside the sphere
#   vessel     a vessel seen end-on: smooth and homogeneous, no pattern at all
# The patterns carry no integrated density and no second moment (both projected out below), so
# what survives downsampling -- their lowest spatial frequencies -- is the same for every kind.
OPACITY_KINDS = ("nodule", "granuloma", "vessel")
# Kind of the one small opacity of a film (at most one, so one attended box can hold it: AG-CNN
# crops a single region, paper Sec. 3.2). Look-alikes are common, as on real films: 60 % of the
# films without a nodule have one, so a view that sees *an* opacity but not which kind reaches
# a Nodule AUC of 0.70 at best (1 - 0.6 / 2). Nodules are common too (half the films), so that a
# few hundred films teach the global branch where the small opacities are (with 30 % nodules and
# 50 % look-alikes it had not learned that in 20 epochs on 1800 films: Nodule AUC 0.55).
OPACITY_RATES = {"nodule": PREVALENCE["Nodule"], "granuloma": 0.15, "vessel": 0.15}
# Radius of a small opacity as a fraction of the image width (diameter 3.2-4.8 %: 14-21 mm on a
# 43 cm film; 4-6 px at 128 px, 16-25 px at 512 px). Smaller ones (2-3 %) were seen too rarely by
# a global branch trained from scratch on a few hundred films for its heatmap to point at them.
OPACITY_RADIUS = (0.016, 0.024)
# Peak density of a small opacity's sphere, in the units of the film's density map.
OPACITY_CONTRAST = (0.16, 0.24)
# Period of the fine patterns in pixels of a 512 px image: far above what a 128 px copy resolves.
PATTERN_PERIOD_512 = 5.5


def _opacity_pattern(kind: str, dist: np.ndarray, theta: np.ndarray, r: float, period: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-sum fine pattern of one small opacity, in units of its contrast."""
    if kind == "vessel":
        return np.zeros_like(dist)
    if kind == "nodule":
        # Spicules: k strands about one period apart along the margin, from inside the sphere
        # to half a radius beyond it.
        k = max(8, int(round(2 * np.pi * r / (0.8 * period))))
        # Minus its mean over the angle (2 / 3 pi): only angular frequencies >= k are left,
        # which have no low spatial frequencies at all.
        strands = np.clip(np.cos(k * theta + rng.uniform(0, 2 * np.pi)), 0, None) ** 3 - 2 / (3 * np.pi)
        t = np.clip((dist - 0.6 * r) / (0.75 * r), 0, 1)
        pattern = 1.6 * strands * np.sin(np.pi * t) ** 2
    elif kind == "granuloma":
        # Popcorn calcification: dense clumps in a ring inside the sphere, as many as fit about
        # 0.6 period apart at half the radius (at least 6), so that, as for the spicules, a larger
        # opacity does not get coarser detail (again minus the angular mean, 1 / 4).
        k = max(6, int(round(np.pi * r / (0.6 * period))))
        clumps = np.clip(np.cos(k * theta + rng.uniform(0, 2 * np.pi)), 0, None) ** 2 - 0.25
        t = np.clip((dist - 0.15 * r) / (0.7 * r), 0, 1)
        pattern = 2.6 * clumps * np.sin(np.pi * t) ** 2
    else:
        raise ValueError(f"unknown opacity kind {kind!r}; valid: {', '.join(OPACITY_KINDS)}")
    # Remove the pattern's integrated density and second moment (Gram-Schmidt against a
    # smooth envelope and envelope * dist^2): a pattern with neither adds nothing to the
    # lowest spatial frequencies, which are all a downsampled copy keeps.
    env = np.exp(-((dist / (1.3 * r)) ** 2))
    basis = []
    for b in (env, env * (dist / r) ** 2):
        for q in basis:
            b = b - (b * q).sum() * q
        basis.append(b / np.sqrt((b * b).sum()))
    for q in basis:
        pattern = pattern - (pattern * q).sum() * q
    return pattern


def _small_opacity(d: np.ndarray, y: int, x: int, r: float, contrast: float, kind: str, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Add a small round opacity of ``kind`` to ``d`` in place; returns the sphere's box."""
    size = d.shape[0]
    R = int(np.ceil(2.0 * r + 3))
    y0, y1, x0, x1 = max(0, y - R), min(size, y + R + 1), max(0, x - R), min(size, x + R + 1)
    # Rendered at 4 x 4 points per pixel and averaged, as a detector integrates over each pixel:
    # point samples of the fine pattern would alias into low frequencies.
    n = 4
    off = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] + off[None, :]).reshape(-1)[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32)[:, None] + off[None, :]).reshape(-1)[None, :]
    dist = np.hypot(yy - y, xx - x)
    theta = np.arctan2(yy - y, xx - x)
    # The pattern period is fixed in millimetres: scale it with the image.
    period = PATTERN_PERIOD_512 * size / 512
    sphere = np.sqrt(np.clip(1.0 - (dist / r) ** 2, 0.0, 1.0)) + 0.3 * _sig(r - dist, 0.7) * (dist < r + 2)
    fine = np.clip(sphere, 0, 1.2) + _opacity_pattern(kind, dist, theta, r, period, rng)
    d[y0:y1, x0:x1] += contrast * fine.reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))
    dist = np.hypot(*np.mgrid[y0 - y : y1 - y, x0 - x : x1 - x])
    ys, xs = np.nonzero(dist <= r)
    return int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max()) + 1, int(y0 + ys.max()) + 1


def make_phantom(rng: np.random.Generator, size: int = 512, anatomy: Anatomy | None = None, findings: dict[str, bool] | None = None,
                 lookalike: str | None = None, omit: Collection[str] = ()):
    """One phantom: ``(uint16 image [size, size] with 12-bit values, labels, boxes)``.

    ``labels`` maps every name in LABELS to 0 / 1; ``boxes`` is a list of
    ``(label, x0, y0, x1, y1)`` in pixels (x1, y1 exclusive). A look-alike opacity is listed
    there too, under its kind (``granuloma`` or ``vessel``, lower case: not a label).
    ``findings`` forces which findings are planted and ``lookalike`` which look-alike (only
    without a nodule); by default both are drawn (:data:`PREVALENCE`, :data:`OPACITY_RATES`).
    ``omit``: findings (or a look-alike kind) drawn but not painted -- the same film, every draw
    the same, that region normal tissue, no label or box: where a finding's evidence lies.
    """
    import cv2

    a = anatomy or draw_anatomy(rng)
    if findings is None:
        findings = {name: bool(rng.random() < p) for name, p in PREVALENCE.items()}
        if not findings["Nodule"]:
            # The film's one small opacity, if any, is a look-alike.
            draw = rng.random() * (1 - OPACITY_RATES["nodule"])
            for kind in ("granuloma", "vessel"):
                draw -= OPACITY_RATES[kind]
                if draw < 0:
                    lookalike = kind
                    break
    if lookalike is not None and (findings["Nodule"] or lookalike not in OPACITY_KINDS[1:]):
        raise ValueError(f"lookalike={lookalike!r}: use one of {OPACITY_KINDS[1:]} on a film without a nodule")
    S = size
    px = 1.0 / S
    u = ((np.arange(S, dtype=np.float32) + 0.5) / S)[None, :]
    v = ((np.arange(S, dtype=np.float32) + 0.5) / S)[:, None]
    adx = np.abs(u - a.cx)
    boxes: list[tuple[str, int, int, int, int]] = []

    # Body: shoulders at the top, a neck above them; thicker (denser) towards the midline.
    # Neck at the top, sloping shoulders, then the chest wall widening slightly downwards.
    shoulder = _sig(v - (0.02 + 0.35 * np.clip(adx - 0.07, 0, None)), 0.01)
    width = a.body * (0.92 + 0.08 * _sig(v - 0.4, 0.15))
    body = _sig(width - adx, 2.5 * px) * shoulder
    thick = np.sqrt(np.clip(1 - (adx / np.maximum(width, 1e-3)) ** 2, 0, 1))
    d = body * (a.tissue * (0.35 + 0.65 * thick**1.5))

    # Heart: an ellipse left of the midline of the patient (image right), larger in cardiomegaly.
    scale = rng.uniform(1.30, 1.45) if findings["Cardiomegaly"] else 1.0
    scale = 1.0 if "Cardiomegaly" in omit else scale
    hx, hy = a.cx + a.heart_x, a.heart_y + (scale - 1) * 0.03
    hr = ((u - hx) / (a.heart_rx * scale)) ** 2 + ((v - hy) / (a.heart_ry * scale)) ** 2
    heart = _sig(1.0 - hr, 0.12)
    if findings["Cardiomegaly"] and "Cardiomegaly" not in omit:
        boxes.append(("Cardiomegaly", *_box(heart)))

    # Lungs (air: darker), cut by the heart and the mediastinum.
    edge = 2.0 * px
    sides = (-1, 1)
    lung = {s: _lung(u, v, a, s, edge) for s in sides}
    medi = _sig(adx - (0.06 + 0.015 * _sig(v - 0.3, 0.05)), 2 * px)
    for s in sides:
        lung[s] = lung[s] * (1 - heart) * medi

    # Lung markings: zero crossings of smooth noise look like branching vessels; denser and
    # thicker near the hila.
    n = _smooth_noise(rng, S, 28) + 0.5 * _smooth_noise(rng, S, 56)
    hilum = np.exp(-(((adx - 0.09) / 0.12) ** 2 + ((v - 0.45) / 0.18) ** 2))
    texture = np.exp(-((n / (0.08 + 0.10 * hilum)) ** 2)) * (0.25 + 0.75 * hilum) + 0.15 * _smooth_noise(rng, S, 16)

    air = np.zeros((S, S), np.float32)
    tex = np.zeros((S, S), np.float32)
    for s in sides:
        air += lung[s]
        tex += lung[s]

    if findings["Pneumothorax"]:
        s = int(rng.choice(sides))
        k = rng.uniform(0.72, 0.84)
    if findings["Pneumothorax"] and "Pneumothorax" not in omit:
        lx, ly = a.cx + s * (a.lung_gap - 0.04), a.top + 0.55 * (a.bottom - a.top)
        collapsed = _lung(lx + (u - lx) / k, ly + (v - ly) / k, a, s, 1.2 * px)
        rim = np.clip(lung[s] - collapsed, 0, 1) * _sig(ly + 0.05 - v, 0.05)
        tex -= rim * lung[s]
        air += 0.3 * rim
        # Visceral pleural line: the edge of the collapsed lung, where the rim is.
        line = 4 * collapsed * (1 - collapsed) * _sig(ly + 0.05 - v, 0.05) * lung[s]
        d += 0.07 * line
        boxes.append(("Pneumothorax", *_box(rim, 0.3)))

    if findings["Effusion"]:
        s = int(rng.choice(sides))
        lx = a.cx + s * a.lung_gap
        lateral = np.clip((u - lx) * s / a.lung_w, -1, 1.2)
        level = a.bottom - rng.uniform(0.08, 0.16) * (a.bottom - a.top)
    if findings["Effusion"] and "Effusion" not in omit:
        # Meniscus: the fluid climbs the lateral chest wall.
        surface = level - 0.07 * np.clip(lateral, 0, None) ** 2
        fluid = _sig(v - surface, 0.012) * lung[s] * _sig(0.25 + lateral, 0.05)
        air -= 0.9 * fluid
        tex -= fluid * lung[s]
        boxes.append(("Effusion", *_box(fluid, 0.3)))

    # Air depth: deepest in the middle of each lung, shallow at the pleural edges.
    # (blurred at quarter resolution: the result is smooth anyway and 16x cheaper)
    small = cv2.resize(air, (S // 4, S // 4), interpolation=cv2.INTER_AREA)
    depth = cv2.resize(cv2.GaussianBlur(small, (0, 0), 0.03 * S / 4), (S, S), interpolation=cv2.INTER_LINEAR)
    d = d - a.tissue * air * (0.22 + 0.35 * depth) + 0.09 * texture * np.clip(tex, 0, 1)
    d = d + 0.05 * heart

    # Spine behind the mediastinum, with vertebral bodies.
    spine = _sig(0.032 - adx, 2 * px) * _sig(v - 0.05, 0.01)
    d += spine * (0.05 + 0.015 * np.cos(2 * np.pi * (v - a.top) / 0.046))

    # Posterior ribs: arcs rising slightly from the spine, then sweeping down along the wall.
    ribcage = _sig(a.body * 0.97 - adx, 3 * px) * _sig(adx - 0.03, 3 * px) * _sig(v - a.top + 0.03, 0.01) * _sig(a.bottom + 0.03 - v, 0.02)
    q = (v - a.top - a.rib_phase + 0.2 * adx - 1.4 * adx**2) / 0.056
    f = q - np.round(q)
    post = np.exp(-((f * 0.056 / 0.0095) ** 2)) * _sig(q + 0.4, 0.1) * _sig(10.4 - q, 0.1)
    # Anterior ribs: fainter bands sloping down towards the midline.
    q2 = (v - a.top - 0.07 + 0.55 * adx) / 0.06
    f2 = q2 - np.round(q2)
    ant = np.exp(-((f2 * 0.06 / 0.011) ** 2)) * _sig(q2 + 0.2, 0.1) * _sig(6.5 - q2, 0.1) * _sig(adx - 0.09, 0.02)
    d += body * ribcage * (0.035 + 0.025 * thick) * (post + 0.5 * ant)

    # Clavicles.
    cy = a.top + 0.015 - 0.16 * adx + 0.32 * adx**2
    clav = np.exp(-(((v - cy) / 0.011) ** 2)) * _sig(adx - 0.035, 0.01) * _sig(0.30 - adx, 0.02)
    d += 0.12 * clav

    lungs = np.clip(lung[-1] + lung[1], 0, 1)
    kind = "nodule" if findings["Nodule"] else lookalike
    if kind is not None:
        r = rng.uniform(*OPACITY_RADIUS) * S
        x, y = _pick_in_lung(rng, lungs, 2 * r + 2)
        # An omitted opacity is painted on a scratch copy, so its random draws are still made.
        shown = kind not in omit and not (kind == "nodule" and "Nodule" in omit)
        box = _small_opacity(d if shown else d.copy(), y, x, r, rng.uniform(*OPACITY_CONTRAST), kind, rng)
        if shown:
            boxes.append(("Nodule" if kind == "nodule" else kind, *box))
    if findings["Mass"]:
        r = rng.uniform(0.03, 0.05) * S
        x, y = _pick_in_lung(rng, lungs, 1.2 * r)
        box = _blob(d if "Mass" not in omit else d.copy(), y, x, r, rng.uniform(0.14, 0.22), rng, lobes=0.12)
        if "Mass" not in omit:
            boxes.append(("Mass", *box))

    # Detector: a little blur, exposure curve, quantum noise, 12-bit levels.
    sigma = 0.6 * S / 512
    d = cv2.GaussianBlur(d.astype(np.float32), (0, 0), sigma)
    d = np.clip(d, 0, None) ** a.gamma
    # Exposure: scaled by the brightest levels above the lung apices, where no finding is drawn;
    # the whole film's (format 3) let an enlarged heart or a pneumothorax shift every pixel a
    # little. The film's 99.5th percentile is 1.06-1.11 times this band's: 0.85 keeps it at ~0.92.
    d = d / max(float(np.percentile(d[: max(1, int((a.top - 0.03) * S))], 99.5)), 1e-6) * 0.85
    d += 0.012 * rng.standard_normal(d.shape, dtype=np.float32) + 0.02 * _smooth_noise(rng, S, 4)
    top = (1 << BITS) - 1
    image = np.clip(np.rint(np.clip(d, 0, 1) * top), 0, top).astype(np.uint16)
    labels = {name: int(any(b[0] == name for b in boxes)) for name in LABELS}
    return image, labels, boxes


# ---------------------------------------------------------------------- writing a data set

def _plan(count: int, seed: int, dicom_fraction: float) -> pd.DataFrame:
    """Which patient each image belongs to, its split and its file format (deterministic in seed)."""
    rng = np.random.default_rng([seed, 1 << 30])
    patients, follow = [], []
    p = 0
    while len(patients) < count:
        n = 2 if rng.random() < 0.2 and len(patients) + 2 <= count else 1
        patients += [p] * n
        follow += list(range(n))
        p += 1
    n_pat = p
    order = rng.permutation(n_pat)
    split = np.empty(n_pat, dtype=object)
    n_test, n_val = int(round(0.15 * n_pat)), int(round(0.15 * n_pat))
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    split[order[n_test + n_val :]] = "train"
    # Mostly 8-bit PNG like the NIH release; every tenth image 16-bit to exercise the readers.
    kinds = np.array(["png16" if i % 10 == 5 else "png" for i in range(count)], dtype=object)
    n_dcm = int(round(dicom_fraction * count))
    if n_dcm:
        chosen = rng.choice(count, size=n_dcm, replace=False)
        # Cycle through the DICOM variants so every one is present in a small set.
        variants = ["dcm", "dcm-mono1", "dcm-rle", "dcm-j2k"]
        for i, idx in enumerate(chosen):
            kinds[idx] = variants[i % len(variants)]
    return pd.DataFrame({"image": range(count), "patient": patients, "follow_up": follow,
                         "split": [split[q] for q in patients], "kind": kinds})


def _write(path: Path, image: np.ndarray, kind: str, patient: str) -> None:
    import cv2

    top = (1 << BITS) - 1
    if kind.startswith("png"):
        if kind == "png16":
            # Full 16-bit range, so a reader that divides by 65535 gets [0, 1].
            pixels = (image.astype(np.uint32) * 65535 // top).astype(np.uint16)
        else:
            pixels = (image >> (BITS - 8)).astype(np.uint8)
        # Fast zlib level: the quantum noise does not compress anyway.
        if not cv2.imwrite(str(path), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write {path}")
        return
    from agcnn.data import dicom_write

    extra = {"BitsStored": BITS, "HighBit": BITS - 1}
    kwargs = dict(modality="DX", patient_name=f"Phantom^{patient}", patient_id=f"PH{patient}")
    pixels = image
    if kind == "dcm-mono1":
        # MONOCHROME1: the stored value grows with brightness of the *display* of air.
        pixels = (top - image.astype(np.int32)).astype(np.uint16)
        kwargs["photometric"] = "MONOCHROME1"
    if kind in ("dcm-rle", "dcm-j2k"):
        from pydicom.uid import JPEG2000Lossless, RLELossless

        kwargs["transfer_syntax"] = RLELossless if kind == "dcm-rle" else JPEG2000Lossless
    try:
        dicom_write.write_dicom(path, pixels, **kwargs, **extra)
    except Exception as e:  # noqa: BLE001 - an encoder missing on this machine
        if kind != "dcm-j2k":
            raise
        log.warning("JPEG 2000 encoding unavailable (%s); writing %s RLE Lossless instead", e, path.name)
        from pydicom.uid import RLELossless

        kwargs["transfer_syntax"] = RLELossless
        dicom_write.write_dicom(path, pixels, **kwargs, **extra)


def _generate_patient(job: tuple) -> list[dict]:
    import cv2

    # One thread per process: the pool already keeps every core busy.
    cv2.setNumThreads(1)
    out_dir, seed, size, patient, rows = job
    rng = np.random.default_rng([seed, patient])
    anatomy = draw_anatomy(rng)
    records = []
    for image_id, follow_up, split, kind in rows:
        if follow_up:
            # Follow-up film: same patient, slightly different positioning and inspiration.
            anatomy = Anatomy(**{**asdict(anatomy), "cx": anatomy.cx + rng.normal(0, 0.006),
                                 "bottom": anatomy.bottom + rng.normal(0, 0.01), "gamma": rng.uniform(0.85, 1.2)})
        image, labels, boxes = make_phantom(rng, size, anatomy)
        rel = f"images/phantom_{image_id:05d}.{'png' if kind.startswith('png') else 'dcm'}"
        _write(Path(out_dir) / rel, image, kind, str(patient))
        records.append({"path": rel, "patient": f"P{patient:05d}", "split": split, "view": "PA", "format": kind,
                        **labels, "boxes": boxes})
    return records


def generate_phantoms(out_dir: str | Path, count: int = 600, size: int = 512, seed: int = 0, *, dicom_fraction: float = 0.1, workers: int = 2) -> Path:
    """Write ``count`` phantoms of ``size`` px into ``out_dir``; returns the path of ``labels.csv``."""
    if count < 1:
        raise ConfigError(f"phantom count must be at least 1, got {count}")
    if size < 64:
        raise ConfigError(f"phantom size must be at least 64 px, got {size}")
    if not 0.0 <= dicom_fraction <= 1.0:
        raise ConfigError(f"dicom_fraction must be in [0, 1], got {dicom_fraction}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan = _plan(count, seed, dicom_fraction)
    jobs = [(str(out), seed, size, int(p), list(g[["image", "follow_up", "split", "kind"]].itertuples(index=False, name=None)))
            for p, g in plan.groupby("patient", sort=True)]
    if workers > 1 and count >= 64:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_generate_patient, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        parts = [_generate_patient(j) for j in jobs]
    records = sorted((r for part in parts for r in part), key=lambda r: r["path"])
    every = pd.DataFrame([(r["path"], *b) for r in records for b in r["boxes"]], columns=["path", "label", "x0", "y0", "x1", "y1"])
    # Look-alikes are not findings: they go to a file of their own, so boxes.csv holds labels only.
    is_label = every["label"].isin(LABELS)
    boxes = every[is_label].reset_index(drop=True)
    every[~is_label].rename(columns={"label": "kind"}).to_csv(out / "lookalikes.csv", index=False)
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "boxes"} for r in records])
    table = table[["path", "patient", "split", "view", "format", *LABELS]]
    boxes.to_csv(out / "boxes.csv", index=False)
    meta = {"version": FORMAT_VERSION, "count": count, "size": size, "seed": seed, "dicom_fraction": dicom_fraction}
    # labels.csv last (atomically): its presence marks a finished set.
    (out / "phantoms.json").write_text(json.dumps(meta, indent=1))
    with atomic_write(out / "labels.csv", "w", newline="") as f:
        table.to_csv(f, index=False)
    return out / "labels.csv"


def ensure_phantoms(root: str | Path, *, count: int, size: int, seed: int, dicom_fraction: float = 0.1) -> Path:
    """``root/labels.csv`` of a phantom set with these settings, generating it when absent or stale."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (one per GPU) may build the datasets at once: the first generates, the
    # others wait for it instead of rewriting the same files underneath it.
    with open(root / ".phantoms.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_phantoms_locked(root, count=count, size=size, seed=seed, dicom_fraction=dicom_fraction)


def _ensure_phantoms_locked(root: Path, *, count: int, size: int, seed: int, dicom_fraction: float) -> Path:
    labels, meta_path = root / "labels.csv", root / "phantoms.json"
    want = {"version": FORMAT_VERSION, "count": count, "size": size, "seed": seed}
    if labels.is_file():
        if not meta_path.is_file():
            raise DataError(f"{str(labels)!r} exists but is not a phantom set (no phantoms.json); with dataset: synthetic, point data.root at an empty folder")
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return labels
        log.info("phantom set in %s was made with %s; regenerating with %s", root, meta, want)
        # Our own files only: the folder's manifest says they were generated here.
        shutil.rmtree(root / "images", ignore_errors=True)
        for name in ("labels.csv", "boxes.csv", "lookalikes.csv", "phantoms.json"):
            (root / name).unlink(missing_ok=True)
    log.info("generating %d phantoms of %d px in %s", count, size, root)
    return generate_phantoms(root, count, size, seed, dicom_fraction=dicom_fraction)


# ---------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write images/, labels.csv, boxes.csv into")
    parser.add_argument("--count", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--dicom-fraction", type=float, default=0.1, help="share of images written as DICOM (default 0.1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")


def run(args: argparse.Namespace) -> int:
    path = generate_phantoms(args.out, args.count, args.size, args.seed, dicom_fraction=args.dicom_fraction, workers=args.workers)
    table = pd.read_csv(path)
    counts = ", ".join(f"{n} {int(table[n].sum())}" for n in FINDINGS)
    none = int((table[list(LABELS)].sum(axis=1) == 0).sum())
    print(f"wrote {len(table)} phantoms to {path.parent} ({counts}; no finding {none})")
    return 0
