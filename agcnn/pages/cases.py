"""The most confident true positives, false positives and false negatives of an evaluation, drawn.

``agcnn evaluate`` keeps no pictures; for a handful of images per finding this module goes
back to the checkpoint and the images: each is scored again (the same evaluation transform and
precision as evaluate) and drawn with its attended box (paper Sec. 3.2, the local branch's
crop) and the fusion head's class activation map of the finding (:mod:`agcnn.explain`).

Which images: per finding, at the fusion operating point the checkpoint stores (0.5 where it
stores none), the ``n`` true positives and false positives with the highest probability and the
``n`` false negatives with the lowest: the calls the model was surest of, right and wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

KINDS = ("TP", "FP", "FN")
CASE_BATCH = 16
KIND_NAMES = {"TP": "true positive", "FP": "false positive", "FN": "false negative"}


def choose_cases(preds: pd.DataFrame, finding: str, threshold: float, n: int, branch: str = "fusion") -> dict[str, list[int]]:
    """Row positions of the ``n`` most confident TP, FP (highest probability) and FN (lowest) of ``finding``."""
    y = preds[finding].to_numpy(dtype=float)
    p = preds[f"p_{branch}_{finding}"].to_numpy(dtype=float)
    called = p >= threshold
    order = np.argsort(-p, kind="stable")
    pick = {
        "TP": [int(i) for i in order if y[i] == 1 and called[i]][:n],
        "FP": [int(i) for i in order if y[i] == 0 and called[i]][:n],
        "FN": [int(i) for i in order[::-1] if y[i] == 1 and not called[i]][:n],
    }
    return pick


def thresholds_of(auc: dict[str, Any], labels: Sequence[str]) -> tuple[dict[str, float], str]:
    """The fusion operating points an evaluation scored, or 0.5 each; and where they came from."""
    ops = auc.get("operating_points_scored") or {}
    if ops.get("branch") == "fusion":
        t = {n: (ops["classes"].get(n) or {}).get("threshold") for n in labels}
        if all(v is not None for v in t.values()):
            return {n: float(v) for n, v in t.items()}, "the checkpoint's fusion operating points"
        return {n: 0.5 if t[n] is None else float(t[n]) for n in labels}, \
            "the checkpoint's fusion operating points (0.5 where a finding has none)"
    return {n: 0.5 for n in labels}, "probability 0.5 (the checkpoint stores no operating points)"


def render_strips(auc: dict[str, Any], folder: Path, n: int, *, data_root: str | None = None) -> tuple[dict[str, tuple[float, str, list]], str, str]:
    """``({finding: (threshold, PNG data URI, [(kind, path, probability)])}, note, how the calls were made)``; the note says why no strip
    could be drawn (checkpoint or images missing), empty when they were."""
    from agcnn.pages.html import figure_uri

    labels = list(auc["labels"])
    if n <= 0:
        return {}, "", ""
    if not auc.get("branches", {}).get("fusion", {}).get("trained"):
        return {}, "The checkpoint's fusion head is not trained: no fusion map to draw.", ""
    preds_path = folder / "predictions.csv"
    if not preds_path.is_file():
        return {}, "predictions.csv is missing from the folder.", ""
    preds = pd.read_csv(preds_path)
    thresholds, how = thresholds_of(auc, labels)
    chosen = {}
    for f in labels:
        if f in preds and f"p_fusion_{f}" in preds and (preds[f] == 1).any():
            picks = choose_cases(preds, f, thresholds[f], n)
            if any(picks.values()):
                chosen[f] = picks
    if not chosen:
        return {}, "No finding has a positive image in this split.", how
    ckpt_path = Path(auc["checkpoint"])
    if not ckpt_path.is_file():
        return {}, f"The checkpoint {auc['checkpoint']} is not at its recorded path, so the cases cannot be drawn.", how
    rows = sorted({i for picks in chosen.values() for v in picks.values() for i in v})
    try:
        drawn = _score_rows(auc, ckpt_path, preds, rows, chosen, data_root)
    except Exception as e:  # noqa: BLE001 - a missing image or moved data must not cost the page
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {}, f"The cases could not be drawn: {first} (agcnn report --data-root DIR names where the images are now)", how
    out = {}
    for f, picks in chosen.items():
        listed = [(kind, str(preds["path"].iloc[i]), float(preds[f"p_fusion_{f}"].iloc[i])) for kind in KINDS for i in picks[kind]]
        out[f] = (thresholds[f], figure_uri(_strip_figure(f, picks, drawn, preds)), listed)
    return out, "", how


def _score_rows(auc, ckpt_path: Path, preds: pd.DataFrame, rows: list[int], chosen, data_root):
    """Per row: the model's input picture, the attended box, and the fusion CAM of every finding it
    is a case of (on the image grid it is drawn on), scored as evaluate scored it (agcnn.inference)."""
    import torch

    from agcnn.config import Config
    from agcnn.data.datasets import XrayDataset
    from agcnn.data.transforms import denormalize, transforms_from_config
    from agcnn.inference import load_for_inference

    loaded = load_for_inference(ckpt_path, "cpu")
    cfg = loaded.config
    raw = cfg.to_dict()
    raw["data"] = {**raw["data"], **{k: v for k, v in (auc.get("data") or {}).items() if k in raw["data"]}}
    if data_root:
        raw["data"]["root"] = data_root
    data = Config.from_dict(raw).data
    labels = loaded.labels
    table = preds.iloc[rows][["path", *labels]].reset_index(drop=True)
    root = data.root if data_root else _image_root(auc, data.root, str(table["path"].iloc[0]))
    dataset = XrayDataset(table, labels, root=root, transform=transforms_from_config(data, train=False), name="cases")
    out = {}
    # A batch of films at a time: one pass gives the boxes and every wanted finding's map.
    for start in range(0, len(rows), CASE_BATCH):
        part = rows[start:start + CASE_BATCH]
        x = torch.stack([dataset[start + k]["image"] for k in range(len(part))])
        wanted = [[labels.index(f) for f, picks in chosen.items() if any(row in v for v in picks.values())] for row in part]
        width = max(len(w) for w in wanted)
        scored = loaded.score(x, classes=[w + [w[0]] * (width - len(w)) for w in wanted])
        maps = scored.explanation.maps["fusion"].float().cpu()
        pictures = denormalize(x).mean(1).numpy()  # the grey films as the model saw them, highres grid
        scale = pictures.shape[-1] / cfg.data.image_size
        for k, row in enumerate(part):
            out[row] = {
                "picture": pictures[k],
                "box": (scored.boxes[k].float().cpu() * scale).tolist(),
                "cams": {labels[c]: maps[k, i].numpy() for i, c in enumerate(wanted[k])},
            }
    return out


def _image_root(auc: dict[str, Any], root: str, first: str) -> str:
    """Where evaluate read the images: ``data.root``, or for a table given by file (``--split
    FILE.csv``) its folder, which evaluate reads relative paths from unless ``data.root`` was set."""
    from agcnn.data.cache import resolve

    source = str(auc.get("split", {}).get("source", ""))
    if source.startswith("the table ") and not Path(resolve(first, Path(root))).exists():
        table_dir = Path(source[len("the table "):]).parent
        if Path(resolve(first, table_dir)).exists():
            return str(table_dir)
    return root


def _strip_figure(finding: str, picks: dict[str, list[int]], drawn: dict, preds: pd.DataFrame):
    """One row of panels per finding: its TP, FP and FN cases, film + fusion CAM + attended box."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cases = [(kind, i) for kind in KINDS for i in picks[kind]]
    cols = max(3, len(cases))  # a strip of one case keeps the size of a panel in a strip of three
    fig = Figure(figsize=(2.1 * cols, 2.3))
    cams = [np.maximum(drawn[i]["cams"][finding], 0) for _, i in cases]
    vmax = max([float(c.max()) for c in cams] + [1e-12])
    for j, ((kind, i), cam) in enumerate(zip(cases, cams)):
        ax = fig.add_subplot(1, cols, j + 1)
        pic = drawn[i]["picture"]
        side = pic.shape[-1]
        ax.imshow(pic, cmap="gray", vmin=0, vmax=1, extent=(0, side, side, 0))
        if cam.max() > 0:
            ax.imshow(np.ma.masked_less_equal(cam, 0), cmap="inferno", vmin=0, vmax=vmax, alpha=0.5,
                      extent=(0, side, side, 0), interpolation="bilinear")
        x0, y0, x1, y1 = drawn[i]["box"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
        p = float(preds[f"p_fusion_{finding}"].iloc[i])
        ax.set_title(f"{kind} p={p:.2f}", fontsize=8, color={"TP": "green", "FP": "firebrick", "FN": "darkorange"}[kind])
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.90, wspace=0.05)
    return fig
