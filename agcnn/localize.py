"""``agcnn localize``: score the attended box and every branch's CAM against radiologists' boxes.

For every ground-truth box (``BBox_List_2017.csv`` of ChestX-ray14, or the phantoms' ``boxes.csv``)
the image goes through the checkpoint's own evaluation transform, and these predicted boxes are
compared with the ground truth mapped onto the model's input grid:

- ``attended``: the box the local branch crops (paper Sec. 3.2; the same box for every finding);
- ``global_cam``, ``local_cam``, ``fusion_cam``: the largest region of the finding's class
  activation map of that branch (:mod:`agcnn.explain`) above a threshold, found by the region
  step of :mod:`agcnn.models.roi`.

Scores, per finding and for all boxes together: accuracy at T(IoU) and T(IoBB) for T in
{0.1, 0.25, 0.5, 0.75} (a box counts as found when its overlap is at least T), and the share of
ground-truth boxes whose centre lies inside the predicted box, each with a percentile bootstrap
interval over the boxes. IoBB is the intersection over the *predicted* box's area, as in Wang et
al. 2017 (ChestX-ray8, Sec. 4.2), whose ResNet-50 numbers at T(IoBB) = 0.5 the report shows
beside ours. Both ratios are invariant under the transform's scaling, so scoring on the input
grid equals scoring in the original pixels within the field of view.

Geometry: a box in the table's pixel space (NIH: 1024 x 1024; phantoms: the image's own pixels)
is scaled to the image as read, then follows the evaluation transform exactly
(:meth:`agcnn.data.geometry.Geometry.to_input`). The model runs at the checkpoint's inference
precision and memory format (:mod:`agcnn.inference`), so the attended box scored here is the
box ``agcnn predict`` writes. A box that loses all of its area to the crop is
counted as out of view and reported, one that loses part is scored on its visible part and
counted as clipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from agcnn.config import EXPLAIN_METHODS
from agcnn.data.boxes import LocalizationError, read_box_table
from agcnn.data.geometry import Geometry
from agcnn.data.provenance import check_boxed_images
from agcnn.errors import UsageError
from agcnn.explain import cam_boxes

log = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.25, 0.5, 0.75)
METHODS = ("attended", "global_cam", "local_cam", "fusion_cam")
# Which trained branches each method needs.
NEEDS = {"attended": "global", "global_cam": "global", "local_cam": "local", "fusion_cam": "fusion"}
# ChestX-ray8 (Wang et al., CVPR 2017), ResNet-50, accuracy at T(IoBB) = 0.5.
WANG2017_IOBB_05 = {
    "Atelectasis": 0.28, "Cardiomegaly": 0.88, "Effusion": 0.33, "Infiltration": 0.42,
    "Mass": 0.14, "Nodule": 0.01, "Pneumonia": 0.38, "Pneumothorax": 0.18,
}
# ---------------------------------------------------------------------- geometry

def clip_box(box: Sequence[float], size: int) -> tuple[tuple[float, float, float, float], float]:
    """Clip a box to ``[0, size]^2``; returns the clipped box and the share of its area kept."""
    x0, y0, x1, y1 = (float(v) for v in box)
    area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    c = (min(max(x0, 0.0), size), min(max(y0, 0.0), size), min(max(x1, 0.0), size), min(max(y1, 0.0), size))
    kept = max(0.0, c[2] - c[0]) * max(0.0, c[3] - c[1])
    return c, (kept / area if area > 0 else 0.0)


def overlaps(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """IoU, IoBB (intersection over the predicted box) and centre-in-box for [N, 4] box pairs."""
    gt, pred = np.asarray(gt, float).reshape(-1, 4), np.asarray(pred, float).reshape(-1, 4)
    iw = np.clip(np.minimum(gt[:, 2], pred[:, 2]) - np.maximum(gt[:, 0], pred[:, 0]), 0, None)
    ih = np.clip(np.minimum(gt[:, 3], pred[:, 3]) - np.maximum(gt[:, 1], pred[:, 1]), 0, None)
    inter = iw * ih
    a_gt = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    a_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
    centre = (pred[:, 0] <= cx) & (cx < pred[:, 2]) & (pred[:, 1] <= cy) & (cy < pred[:, 3])
    return {
        "iou": inter / np.maximum(a_gt + a_pred - inter, 1e-12),
        "iobb": inter / np.maximum(a_pred, 1e-12),
        "centre": centre.astype(float),
    }


# ---------------------------------------------------------------------- scoring

def _find_image(root: Path, rel: str, index: dict[str, str] | None) -> tuple[Path | None, dict[str, str] | None]:
    direct = root / rel
    if direct.is_file():
        return direct, index
    if index is None:
        # NIH ships its images in images_001/images/ ... folders: look them up by file name.
        index = {}
        for dirpath, _, files in os.walk(root):
            for f in files:
                index.setdefault(f, os.path.join(dirpath, f))
    found = index.get(Path(rel).name)
    return (Path(found) if found else None), index


@dataclass
class _Image:
    """One image of the box table, decoded and transformed."""

    rel: str
    boxes: pd.DataFrame
    x: torch.Tensor
    height: int
    width: int


def _images(table: pd.DataFrame, root: Path, transform, counts: dict[str, Any]):
    """The table's images in path order, transformed; a missing or unreadable one is counted."""
    from agcnn.data import readers

    index: dict[str, str] | None = None
    for rel, boxes in table.groupby("path", sort=True):
        full, index = _find_image(root, rel, index)
        if full is None:
            counts["missing_images"].append(rel)
            continue
        try:
            pixels = readers.read_image(full)
        except readers.UnusableImageError as e:
            counts["unreadable_images"].append(f"{rel}: {e.reason}")
            continue
        h, w = pixels.shape
        yield _Image(rel, boxes, transform(torch.from_numpy(np.ascontiguousarray(pixels))[None]), h, w)


def _batches(images, size: int):
    batch: list[_Image] = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _predicted(scored, methods: Sequence[str], cam_threshold: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each method's predicted boxes on the input grid, and whether its map was empty."""
    ex = scored.explanation
    n = len(scored.boxes)
    pred: dict[str, np.ndarray] = {"attended": scored.boxes.cpu().numpy().astype(float)}
    empty: dict[str, np.ndarray] = {"attended": np.zeros(n, bool)}
    for branch in ("global", "local", "fusion"):
        if f"{branch}_cam" in methods:
            bx, em = cam_boxes(ex.maps[branch], cam_threshold)
            pred[f"{branch}_cam"], empty[f"{branch}_cam"] = bx.cpu().numpy().astype(float), em.cpu().numpy()
    return pred, empty


def _box_rows(image: _Image, findings: list[int], pred, empty, probs: np.ndarray, i: int, *, labels: list[str],
              geometry: Geometry, methods: Sequence[str], counts: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one image's ground-truth boxes: one per (box, method)."""
    rows = []
    h, w, size = image.height, image.width, geometry.image_size
    for _, gt in image.boxes.iterrows():
        sw, sh = (w, h) if gt["space_w"] == 0 else (gt["space_w"], gt["space_h"])
        orig = (gt["x0"] * w / sw, gt["y0"] * h / sh, gt["x1"] * w / sw, gt["y1"] * h / sh)
        gt_in, kept = clip_box(geometry.to_input(orig, height=h, width=w), size)
        if kept <= 0:
            counts["out_of_view"][gt["label"]] += 1
            continue
        if kept < 1 - 1e-9:
            counts["clipped"][gt["label"]] += 1
        j = findings.index(labels.index(gt["label"]))
        for method in methods:
            p = pred[method][i] if method == "attended" else pred[method][i, j]
            e = bool(empty[method][i] if method == "attended" else empty[method][i, j])
            sc = overlaps(np.array(gt_in), p)
            rows.append({
                "path": image.rel, "label": gt["label"], "method": method,
                "iou": float(sc["iou"][0]), "iobb": float(sc["iobb"][0]), "centre_in_box": bool(sc["centre"][0]),
                "empty_map": e, "probability": float(probs[i, labels.index(gt["label"])]),
                "visible_share": round(kept, 6),
                **{f"gt_{c}": round(v, 3) for c, v in zip(("x0", "y0", "x1", "y1"), gt_in)},
                **{f"pred_{c}": float(v) for c, v in zip(("x0", "y0", "x1", "y1"), p)},
            })
    return rows


def score_boxes(
    model: torch.nn.Module,
    cfg,
    table: pd.DataFrame,
    images: str | os.PathLike[str],
    *,
    methods: Sequence[str] = METHODS,
    cam_threshold: float = 0.5,
    explain_method: str = "cam",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    keep_inputs: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every box of ``table`` (from :func:`read_box_table`) for each of ``methods``.

    The model runs at ``cfg``'s inference precision and memory format (:func:`agcnn.inference.score`).
    Returns one row per (box, method) with ``iou``, ``iobb``, ``centre``, the predicted and
    ground-truth boxes on the input grid and flags, and counts of boxes not scored (image
    missing or unreadable, box out of the field of view). With ``keep_inputs`` the counts carry
    ``inputs``: the model's view of each image (for the pictures of best and worst cases).
    """
    from agcnn.data.transforms import denormalize, transforms_from_config
    from agcnn.inference import memory_format_of, score

    geometry, labels = Geometry.from_config(cfg), list(cfg.labels)
    model = model.eval().to(torch.device(device))
    counts: dict[str, Any] = {"boxes": int(len(table)), "images": int(table["path"].nunique()), "missing_images": [],
                              "unreadable_images": [], "out_of_view": Counter(), "clipped": Counter()}
    rows: list[dict[str, Any]] = []
    inputs: dict[str, np.ndarray] = {}
    transform = transforms_from_config(cfg.data, train=False)
    for batch in _batches(_images(table, Path(images), transform, counts), batch_size):
        findings = [sorted({labels.index(lab) for lab in b.boxes["label"]}) for b in batch]
        k = max(len(f) for f in findings)
        classes = torch.tensor([f + [f[0]] * (k - len(f)) for f in findings])
        # The checkpoint's precision: the attended box is the one predict writes for the image.
        scored = score(model, torch.stack([b.x for b in batch]), precision=cfg.train.inference_precision,
                       memory_format=memory_format_of(cfg), classes=classes, method=explain_method)
        pred, empty = _predicted(scored, methods, cam_threshold)
        probs = scored.probabilities("fusion" if "fusion_cam" in methods else "global").cpu().numpy()
        if keep_inputs:
            view = denormalize(model.global_input(scored.input.float()))[:, 0]  # what the global branch saw, in [0, 1]
            for b, v in zip(batch, view.cpu().numpy()):
                inputs[b.rel] = (v * 255).round().astype(np.uint8)
        for i, image in enumerate(batch):
            rows += _box_rows(image, findings[i], pred, empty, probs, i, labels=labels, geometry=geometry,
                              methods=methods, counts=counts)
    counts["out_of_view"] = dict(counts["out_of_view"])
    counts["clipped"] = dict(counts["clipped"])
    if keep_inputs:
        counts["inputs"] = inputs
    return pd.DataFrame(rows), counts


def bootstrap_share(values: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of 0/1 ``values`` and its percentile bootstrap interval (NaN when empty or ``n_boot`` is 0)."""
    values = np.asarray(values, float)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if n_boot <= 0:
        return mean, math.nan, math.nan
    # Resampling n values with replacement: the count of ones is binomial(n, mean).
    draws = rng.binomial(values.size, mean, size=n_boot) / values.size
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


def summarise(scores: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy at each T(IoU) / T(IoBB) and the centre-in-box share, per method and finding ("all" pools them)."""
    rng = np.random.default_rng(seed)
    out = []
    if scores.empty:
        return pd.DataFrame(columns=["method", "finding", "metric", "threshold", "n", "value", "ci_low", "ci_high"])
    for method in [m for m in METHODS if m in set(scores["method"])]:
        sm = scores[scores["method"] == method]
        findings = sorted(set(sm["label"]))
        for finding in [*findings, "all"]:
            sub = sm if finding == "all" else sm[sm["label"] == finding]
            tests = [(metric, t, sub[metric].to_numpy() >= t) for metric in ("iou", "iobb") for t in THRESHOLDS]
            tests.append(("centre_in_box", math.nan, sub["centre_in_box"].to_numpy()))
            for metric, t, hits in tests:
                mean, lo, hi = bootstrap_share(hits, n_boot, rng)
                out.append({"method": method, "finding": finding, "metric": metric, "threshold": t, "n": int(len(sub)),
                            "value": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------- report

def _cell(r: pd.Series | None) -> str:
    if r is None or pd.isna(r["value"]):
        return "–"
    if pd.isna(r["ci_low"]):
        return f"{r['value']:.2f}"
    return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def markdown_report(summary: pd.DataFrame, counts: dict[str, Any], settings: dict[str, Any]) -> str:
    """Tables laid out like Wang et al. 2017 (Table 3): one row per T, one column per finding."""
    lines = ["# Localisation against ground-truth boxes" + "".join(f" ({c})" for c in settings.get("caveats", [])), ""]
    lines.append(
        f"Checkpoint `{settings['checkpoint']}`; boxes `{settings['boxes']}`; {counts['boxes']} boxes on "
        f"{counts['images']} images. Maps: {settings['explain']}; CAM boxes: largest region above "
        f"{settings['cam_threshold']} of each map's maximum; attended box: the model's threshold "
        f"{settings['attention_threshold']}. Intervals: 95 % percentile bootstrap over boxes "
        f"({settings['bootstrap']} resamples)."
        + (" With `max` pooling a CAM shows where weighted channels are active, not how the logit was formed: it can "
           "lie far from a finding called right (docs/demo.md)." if settings.get("pool") == "max" else ""))
    lines.append("")
    missing, unreadable = counts["missing_images"], counts["unreadable_images"]
    oov, clipped = sum(counts["out_of_view"].values()), sum(counts["clipped"].values())
    lines.append(
        f"Not scored: {len(missing)} images not found, {len(unreadable)} unreadable, {oov} boxes outside the "
        f"field of view after the centre crop"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(counts['out_of_view'].items()))})" if oov else "")
        + f". Scored on their visible part: {clipped} boxes partly cut by the crop.")
    lines.append("")
    if summary.empty:
        lines.append("No box could be scored.")
        return "\n".join(lines) + "\n"
    findings = [f for f in dict.fromkeys(summary["finding"]) if f != "all"]
    order = [f for f in WANG2017_IOBB_05 if f in findings] + [f for f in findings if f not in WANG2017_IOBB_05]
    cols = [*order, "all"]
    names = {"attended": "Attended box (local branch crop)", "global_cam": "Global branch CAM",
             "local_cam": "Local branch CAM", "fusion_cam": "Fusion CAM"}
    for method in [m for m in METHODS if m in set(summary["method"])]:
        sm = summary[summary["method"] == method]
        lines += [f"## {names[method]}", "", "| T | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        n_row = {f: int(sm[sm["finding"] == f]["n"].iloc[0]) for f in cols}
        lines.append("| boxes | " + " | ".join(str(n_row[f]) for f in cols) + " |")
        for metric, label in (("iou", "T(IoU)"), ("iobb", "T(IoBB)")):
            for t in THRESHOLDS:
                cells = []
                for f in cols:
                    r = sm[(sm["finding"] == f) & (sm["metric"] == metric) & (sm["threshold"] == t)]
                    cells.append(_cell(r.iloc[0] if len(r) else None))
                lines.append(f"| {label}={t} Acc. | " + " | ".join(cells) + " |")
        cells = [_cell(sm[(sm["finding"] == f) & (sm["metric"] == "centre_in_box")].iloc[0]) for f in cols]
        lines.append("| centre in box | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Against Wang et al. 2017 (ChestX-ray8, ResNet-50), accuracy at T(IoBB)=0.5", ""]
    wcols = list(WANG2017_IOBB_05)
    lines += ["| | " + " | ".join(wcols) + " |", "|---" * (len(wcols) + 1) + "|"]
    lines.append("| Wang et al. 2017 | " + " | ".join(f"{WANG2017_IOBB_05[f]:.2f}" for f in wcols) + " |")
    for method in [m for m in METHODS if m in set(summary["method"])]:
        sm = summary[(summary["method"] == method) & (summary["metric"] == "iobb") & (summary["threshold"] == 0.5)]
        vals = {r["finding"]: r for _, r in sm.iterrows()}
        lines.append(f"| {names[method]} | " + " | ".join(_cell(vals.get(f)) for f in wcols) + " |")
    lines.append("")
    return "\n".join(lines) + "\n"


def write_cases(path: Path, scores: pd.DataFrame, inputs: dict[str, np.ndarray], *, method: str, n: int) -> bool:
    """A picture grid: the ``n`` best and ``n`` worst boxes by IoU of ``method``. False if none."""
    sm = scores[(scores["method"] == method) & scores["path"].isin(list(inputs))]
    if sm.empty or n <= 0:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from agcnn.fileio import atomic_write_bytes

    ranked = sm.sort_values(["iou", "iobb"], ascending=False, kind="stable")
    best, worst = ranked.head(n), ranked.tail(min(n, max(0, len(ranked) - n)))[::-1]
    rows = [("best", best), ("worst", worst)] if len(worst) else [("best", best)]
    fig = Figure(figsize=(2.4 * n, 2.7 * len(rows)), dpi=100)
    attended = scores[scores["method"] == "attended"].drop_duplicates("path").set_index("path")
    for r, (kind, part) in enumerate(rows):
        for c, (_, row) in enumerate(part.iterrows()):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            img = inputs[row["path"]]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            def box(prefix: str, colour: str, src=row) -> None:
                x0, y0, x1, y1 = (float(src[f"{prefix}_{k}"]) for k in ("x0", "y0", "x1", "y1"))
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.3))
            box("gt", "lime")
            box("pred", "red")
            if method != "attended" and row["path"] in attended.index:
                box("pred", "cyan", attended.loc[row["path"]])
            ax.set_title(f"{kind}: {row['label']}\nIoU {row['iou']:.2f} IoBB {row['iobb']:.2f}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(f"{method}: ground truth (green), predicted (red), attended box (cyan)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    return True


@dataclass
class LocalizeOptions:
    """One ``agcnn localize`` run: the checkpoint, the box table, its images and the report folder."""

    checkpoint: str | os.PathLike[str]
    boxes: str | os.PathLike[str]
    images: str | os.PathLike[str]
    out: str | os.PathLike[str]
    box_space: str | None = None
    cam_threshold: float = 0.5
    explain: str = "cam"
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    cases: int = 4
    allow_other_split: bool = False  # score boxes on (possibly) training patients' images; refused otherwise
    external_site: bool = False  # the box table is another site's: patients no key here can check are declared, not refused

    def check(self) -> LocalizeOptions:
        """Raise :class:`UsageError` for an option that cannot work; nothing is read or written yet."""
        from agcnn.config import EXPLAIN_METHODS, valid_device

        if self.explain not in EXPLAIN_METHODS:
            raise UsageError(f"--explain {self.explain!r} is not a method; use {' or '.join(EXPLAIN_METHODS)}")
        if not 0.0 <= self.cam_threshold < 1.0:
            raise UsageError(f"--cam-threshold {self.cam_threshold} must be in [0, 1); 0.5 is the half-maximum contour")
        if self.bootstrap < 0 or self.batch_size < 1 or self.cases < 0:
            raise UsageError(f"--bootstrap ({self.bootstrap}) and --cases ({self.cases}) must be 0 or more, "
                             f"--batch-size ({self.batch_size}) at least 1")
        if not valid_device(self.device):
            raise UsageError(f"--device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if not Path(self.images).is_dir():
            raise UsageError(f"--images {str(self.images)!r} is not a folder; pass the folder that holds the box table's images")
        return self


def localize_checkpoint(
    checkpoint: str | os.PathLike[str], boxes: str | os.PathLike[str], images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str], *, explain_method: str = "cam", **options: Any,
) -> dict[str, Any]:
    """``localize(LocalizeOptions(checkpoint, boxes, images, out_dir, explain=explain_method, **options))``."""
    return localize(LocalizeOptions(checkpoint, boxes, images, out_dir, explain=explain_method, **options))


def localize(options: LocalizeOptions) -> dict[str, Any]:
    """Score a checkpoint against a box table; write ``localization.csv/.json/.md`` (and
    ``localization_boxes.csv``, ``localization_cases.png``, ``report.html``) into ``options.out``;
    return the report."""
    from agcnn.inference import load_for_inference
    from agcnn.pages import write_report_or_warn

    o = options.check()
    loaded = load_for_inference(o.checkpoint, o.device)
    cfg = loaded.config
    methods = [m for m in METHODS if NEEDS[m] in loaded.branches]
    table = read_box_table(o.boxes, cfg.labels, o.box_space)
    provenance = check_boxed_images(loaded.meta, cfg, table["path"], allow=o.allow_other_split,  # before any work
                                    external=o.external_site)
    scores, counts = score_boxes(loaded.model, cfg, table, o.images, methods=methods, cam_threshold=o.cam_threshold,
                                 explain_method=o.explain, batch_size=o.batch_size, device=loaded.device,
                                 keep_inputs=o.cases > 0)
    inputs = counts.pop("inputs", {})
    if counts["missing_images"] and len(counts["missing_images"]) == counts["images"]:
        raise LocalizationError(
            f"none of the {counts['images']} images of {str(o.boxes)!r} was found under {str(o.images)!r} "
            f"(first: {counts['missing_images'][0]}); pass the folder that holds them with --images"
        )
    summary = summarise(scores, n_boot=o.bootstrap, seed=o.seed)
    settings = {
        "checkpoint": str(o.checkpoint), "boxes": str(o.boxes), "images": str(o.images), "box_space": o.box_space,
        "explain": o.explain, "cam_threshold": o.cam_threshold, "attention_threshold": cfg.model.threshold,
        "bootstrap": o.bootstrap, "seed": o.seed, "methods": methods, "trained_branches": list(loaded.branches),
        "pool": cfg.model.pool, "geometry": Geometry.from_config(cfg).as_dict(), "inference_precision": loaded.precision,
        "pixels": {"source": "original"}, "training_patients": provenance, "caveats": provenance["caveats"],
    }
    report = {
        "settings": settings,
        "counts": counts,
        "wang2017_resnet50_iobb_0.5": WANG2017_IOBB_05,
        "summary": json.loads(summary.to_json(orient="records")),
    }
    _write_report(Path(o.out), report, summary, scores)
    method = "fusion_cam" if "fusion_cam" in methods else methods[-1]
    report["cases"] = write_cases(Path(o.out) / "localization_cases.png", scores, inputs, method=method, n=o.cases) if o.cases else False
    write_report_or_warn(o.out)  # report.html: the tables, the cases and the model card on one page
    return report


def _write_report(out: Path, report: dict[str, Any], summary: pd.DataFrame, scores: pd.DataFrame) -> None:
    from agcnn.fileio import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "localization.csv", lambda f: summary.to_csv(f, index=False))
    atomic_write_bytes(out / "localization_boxes.csv", lambda f: scores.to_csv(f, index=False))
    atomic_write_bytes(out / "localization.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    md = markdown_report(summary, report["counts"], report["settings"])
    atomic_write_bytes(out / "localization.md", lambda f: f.write(md.encode()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by `agcnn train`")
    parser.add_argument("--boxes", required=True,
                        help="box table: NIH BBox_List_2017.csv(.gz) or a boxes.csv (path, label, x0, y0, x1, y1)")
    parser.add_argument("--images", required=True, help="folder with the table's images (searched by file name if not at the table's path)")
    parser.add_argument("--out", required=True, help="folder for localization.csv, .json, .md and the picture of cases")
    parser.add_argument("--box-space", default=None, metavar="SPACE",
                        help="pixel space of the table's boxes: image (the image's own size), N or WxH "
                             "(default: 1024 for the NIH table, image for boxes.csv)")
    parser.add_argument("--cam-threshold", type=float, default=0.5,
                        help="a CAM box is the largest region above this fraction of the map's maximum (default 0.5)")
    parser.add_argument("--explain", choices=EXPLAIN_METHODS, default="cam",
                        help="class activation maps (default) or Grad-CAM from monai.visualize")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--cases", type=int, default=4, metavar="N",
                        help="best and worst N cases in localization_cases.png (default 4; 0 = no picture)")
    parser.add_argument("--allow-other-split", action="store_true", help="score boxes on training patients' images too")
    parser.add_argument("--external-site", action="store_true",
                        help="the boxes are another site's films, so no training patient: images whose patients no key "
                             "here can check are scored, and every report says this was declared, not checked "
                             "(a patient shared with the training data is still refused)")


def run(args: argparse.Namespace) -> int:
    report = localize(LocalizeOptions(
        args.checkpoint, args.boxes, args.images, args.out, box_space=args.box_space, cam_threshold=args.cam_threshold,
        explain=args.explain, bootstrap=args.bootstrap, seed=args.seed, batch_size=args.batch_size,
        device=args.device, cases=args.cases, allow_other_split=args.allow_other_split,
        external_site=args.external_site,
    ))
    s = pd.DataFrame(report["summary"])
    n_scored = int(s[(s["finding"] == "all")]["n"].max()) if not s.empty else 0
    c = report["counts"]
    parts = []
    if not s.empty:
        for method in report["settings"]["methods"]:
            r = s[(s["method"] == method) & (s["finding"] == "all") & (s["metric"] == "iobb") & (s["threshold"] == 0.5)]
            if len(r):
                parts.append(f"{method} {r['value'].iloc[0]:.2f}")
    print(f"{n_scored} of {c['boxes']} boxes scored ({len(c['missing_images'])} images missing, "
          f"{sum(c['out_of_view'].values())} boxes out of view); accuracy at T(IoBB)=0.5: {', '.join(parts) or '-'}; "
          f"report in {args.out}/localization.md")
    return 0
