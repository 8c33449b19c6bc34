"""``agcnn demo``: the whole pipeline on generated phantoms, on a CPU, from any folder.

1. generate the phantom set (``agcnn.data.synthetic``) under ``OUT/phantoms``;
2. train the global, local and fusion stages (``agcnn.train``) into ``OUT/run`` with the
   configuration shipped inside the package (``agcnn/configs/demo.yaml``);
3. evaluate the fusion checkpoint on the held-out test split (``agcnn.evaluate``);
4. the evidence of the mechanism on that split: the paired patient-bootstrap interval of fusion
   minus global mean AUC, how often the attended box holds the planted small opacity, and an
   overlay picture of an image whose Nodule call the local branch changed, only where the
   attended box holds that film's planted opacity; when these numbers do not show the
   mechanism, one line says so, names the longer run (``--long``) and where its record is;
5. predict a few of the generated DICOM files (``agcnn.predict``);
6. print the per-finding AUC table, that evidence, and every path written, and write them with the
   evaluation and predictions as one page, ``OUT/report.html`` (``agcnn.pages``).

``--quick`` shrinks everything (a few dozen small phantoms, one epoch per stage) to check the
installation in well under a minute; its numbers mean nothing. ``--long`` trains on three times
the phantoms and twice the global epochs (:data:`LONG`). ``--seed N`` draws another phantom set
(``data.synthetic_seed``); ``--control-same-resolution`` crops the local input from the global
input itself, as the paper does (``data.highres_size`` = ``data.image_size``), so that a run
with and one without it separate what the attention adds from what the resolution adds;
``--global-from DIR`` takes the phantoms and the trained global stage of the finished run in DIR,
so that the control differs from that run in the local branch's input only.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agcnn.config import Config
from agcnn.errors import ConfigError

DEMO_CONFIG = "demo.yaml"

# The quick variant: tiny images and one epoch per stage.
QUICK = [
    "data.synthetic_count=48", "data.synthetic_size=64", "data.resize=32", "data.image_size=32",
    "data.highres_size=64", "model.local_size=32", "data.num_workers=0",
    "train.global.epochs=1", "train.local.epochs=1", "train.fusion.epochs=2",
    "train.global.batch_size=8", "train.local.batch_size=8", "train.fusion.batch_size=8",
    "train.bootstrap=0",
]

# The long variant (about 22 min on an idle 2-core CPU): three times the phantoms and twice the
# global epochs, so that the global branch can learn where the small opacities are and its
# heatmap point at them -- on the phantom set the design was developed on it did, on five fresh
# sets it did not (docs/demo.md, "Seeds and the control run"); every other value as in the demo
# config.
LONG = ["data.synthetic_count=1800", "train.global.epochs=40"]
# What the demo says when a run's own numbers do not show the mechanism: the longer run, and
# where its record is (it showed the mechanism on some phantom sets, not on every one).
LONG_COMMAND = "agcnn demo --long"
LONG_TIME = "about 22 min on 2 cores"
LONG_RECORD = "docs/demo.md lists the phantom sets on which --long showed the mechanism and those on which it did not"
# The run shows the mechanism when the box holds at least this share of the test nodules (and
# the paired interval of fusion - global lies above 0).
HELD_SHARE = 0.5

# The demo prints its own summary; library INFO lines would only interleave with it.
LOG_LEVEL = logging.WARNING


def demo_config_path() -> Path:
    """The demo configuration shipped as package data."""
    return Path(str(resources.files("agcnn") / "configs" / DEMO_CONFIG))


def demo_config(out: Path, quick: bool = False, overrides: list[str] | None = None, long: bool = False,
                seed: int | None = None, same_resolution: bool = False) -> Config:
    """The demo's configuration: the shipped file, then the preset, ``--seed``, ``--set`` items
    and, with ``same_resolution``, the paper's local input (cropped from the global input)."""
    if quick and long:
        raise ConfigError("--quick and --long exclude each other; pass one of them")
    preset = QUICK if quick else LONG if long else []
    items = [f"data.root={out / 'phantoms'}", *preset, *([f"data.synthetic_seed={seed}"] if seed is not None else []),
             *(overrides or [])]
    cfg = Config.load(demo_config_path(), items)
    if same_resolution:
        # The control: the attended box cropped from the image the global branch saw (paper
        # Sec. III-B), not from a higher-resolution copy; everything else the same.
        cfg = Config.load(demo_config_path(), [*items, f"data.highres_size={cfg.data.image_size}"])
    return cfg


def _dicom_samples(cfg: Config, dest: Path, n: int) -> list[Path]:
    """Copy up to ``n`` generated DICOM files of the test split into ``dest``."""
    root = Path(cfg.data.root)
    table = pd.read_csv(root / "labels.csv")
    dicom = table[(table["split"] == "test") & table["path"].str.endswith(".dcm")]
    if dicom.empty:
        dicom = table[table["path"].str.endswith(".dcm")]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for rel in dicom["path"].head(n):
        target = dest / Path(rel).name
        shutil.copyfile(root / rel, target)
        out.append(target)
    return out


# ---------------------------------------------------------------------- the evidence

def to_global_pixels(xy: np.ndarray, original: int, data) -> np.ndarray:
    """Points in pixels of an ``original`` x ``original`` image -> pixels of the global input
    (the evaluation transform's geometry, :meth:`agcnn.data.geometry.Geometry.to_input`)."""
    from agcnn.data.geometry import Geometry

    g = Geometry.from_config(data)
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.array([g.to_input((x, y, x, y), height=original, width=original)[:2] for x, y in pts]).reshape(-1, 2)


def centres_in_boxes(centres: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each point ``(x, y)`` lies inside its box ``(x0, y0, x1, y1)`` (x1, y1 exclusive)."""
    c, b = np.asarray(centres, dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    return (b[:, 0] <= c[:, 0]) & (c[:, 0] < b[:, 2]) & (b[:, 1] <= c[:, 1]) & (c[:, 1] < b[:, 3])


def small_opacities(root: Path, paths: list[str]) -> pd.DataFrame:
    """The planted nodules and look-alikes of these images: ``row, kind, cx, cy`` (original pixels)."""
    boxes = pd.read_csv(root / "boxes.csv")
    boxes = boxes[boxes["label"] == "Nodule"].rename(columns={"label": "kind"}).assign(kind="nodule")
    look = root / "lookalikes.csv"
    parts = [boxes, pd.read_csv(look)] if look.is_file() else [boxes]
    every = pd.concat(parts, ignore_index=True)
    row = {p: i for i, p in enumerate(paths)}
    every = every[every["path"].isin(row)]
    return pd.DataFrame({"row": every["path"].map(row).to_numpy(), "kind": every["kind"].to_numpy(),
                         "cx": ((every["x0"] + every["x1"]) / 2).to_numpy(), "cy": ((every["y0"] + every["y1"]) / 2).to_numpy()})


def attention_pass(loaded, dataset, batch_size: int) -> dict[str, np.ndarray]:
    """Attended boxes (global-input pixels) and heatmaps of every image of ``dataset``, in order,
    scored as predict scores them (``loaded``: :func:`agcnn.inference.load_for_inference`)."""
    from torch.utils.data import DataLoader

    boxes, heatmaps = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        scored = loaded.score(batch["image"], stage="fusion")
        boxes.append(scored.boxes.cpu().numpy())
        heatmaps.append(scored.heatmap.cpu().numpy())
    return {"boxes": np.concatenate(boxes), "heatmaps": np.concatenate(heatmaps)}


def attended_opacities(loaded, dataset, cfg: Config, batch_size: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The planted small opacities of ``dataset`` (:func:`small_opacities`), each with ``inside``:
    whether its centre lies in its image's attended box; and the attention pass itself."""
    seen = attention_pass(loaded, dataset, batch_size)
    ops = small_opacities(Path(cfg.data.root), list(dataset.table["path"]))
    centres = to_global_pixels(ops[["cx", "cy"]].to_numpy(), cfg.data.synthetic_size, cfg.data)
    ops["inside"] = centres_in_boxes(centres, seen["boxes"][ops["row"].to_numpy()])
    return ops, seen


def inside_counts(ops: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """kind -> (opacities whose centre is in the attended box, opacities)."""
    return {kind: (int(g["inside"].sum()), int(len(g))) for kind, g in ops.groupby("kind")}


def box_area(boxes: np.ndarray, image_size: int) -> float:
    """Mean area of pixel boxes ``(x0, y0, x1, y1)`` as a share of the ``image_size`` square."""
    return float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))) / image_size**2


def _changed_call(preds: pd.DataFrame, thresholds: dict[str, list[float]], labels: list[str], finding: str = "Nodule",
                  eligible: np.ndarray | None = None) -> int | None:
    """Row of the test image where the fusion call on ``finding`` is right and the global call
    wrong, each at its own validation operating point, with the largest change of probability.

    The change must come from the probability, not from the two operating points alone: the
    global probability would have made the wrong call at the fusion operating point too.
    ``eligible`` (bool per row): the rows that may be chosen -- in the demo, the films whose
    attended box holds their planted small opacity, so that the picture never shows a changed
    call whose box looked elsewhere. The choice uses the test labels ("right" and "wrong"), as
    the README says; it picks an example, it measures nothing."""
    k = labels.index(finding)
    y = preds[finding].to_numpy(dtype=float)
    g, f = preds[f"p_global_{finding}"].to_numpy(), preds[f"p_fusion_{finding}"].to_numpy()
    call_g, call_f = g >= thresholds["global"][k], f >= thresholds["fusion"][k]
    ok = (call_f == (y == 1)) & (call_g != (y == 1)) & ((g >= thresholds["fusion"][k]) != call_f)
    if eligible is not None:
        ok &= np.asarray(eligible, dtype=bool)
    if not ok.any():
        return None
    return int(np.flatnonzero(ok)[np.argmax(np.abs(f - g)[ok])])


def _overlay(path: Path, loaded, dataset, row: int, box: np.ndarray, heatmap: np.ndarray, cfg: Config, finding: str,
             prob: float) -> None:
    """The overlay picture (agcnn.overlays) of one test image, the fusion CAM of ``finding``,
    drawn as ``agcnn predict --overlays`` draws it."""
    import torch

    from agcnn.data.geometry import Geometry
    from agcnn.overlays import FindingMap, write_overlay

    image = dataset.load(row)
    h, w = image.shape
    g = Geometry.from_config(cfg)
    x = dataset[row]["image"][None]
    # The fusion map: the call was changed by the local branch, whose evidence only this map shows.
    classes = torch.tensor([[list(cfg.labels).index(finding)]])
    cam = loaded.score(x, classes=classes, method="cam").explanation.maps["fusion"][0, 0].cpu().numpy()
    write_overlay(path, preview=(image * 255).astype(np.uint8), height=h, width=w,
                  box=g.to_original(box.tolist(), height=h, width=w), field=g.field(height=h, width=w), heatmap=heatmap,
                  findings=[FindingMap(finding, prob, cam)])


def evidence(cfg: Config, checkpoint: Path, evaluation: Path, out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """What the demo reports beside the AUC table, on the test split: the paired interval of
    fusion minus global mean AUC, how often the attended box holds a planted small opacity,
    and an overlay of an image whose call the local branch changed."""
    from agcnn.data.datasets import build_datasets
    from agcnn.inference import load_for_inference
    from agcnn.metrics import paired_bootstrap_mean_auc_difference, per_class_auc

    labels = list(cfg.labels)
    dataset = build_datasets(cfg, splits=("test",))["test"]
    preds = pd.read_csv(evaluation / "predictions.csv")
    if list(preds["path"]) != list(dataset.table["path"]):
        raise RuntimeError("predictions.csv does not list the test split in order; rerun the demo into a new --out")
    y = preds[labels].to_numpy(dtype=float)
    prob = {b: preds[[f"p_{b}_{n}" for n in labels]].to_numpy() for b in ("global", "local", "fusion")}
    groups = dataset.table["patient"].astype(str).to_numpy()
    if cfg.train.bootstrap > 0:
        # Seed 0, as evaluate uses for the per-branch intervals.
        diff, lo, hi = paired_bootstrap_mean_auc_difference(prob["fusion"], prob["global"], y, n_boot=cfg.train.bootstrap,
                                                            seed=0, groups=groups)
    else:
        diff, lo, hi = float(np.nanmean(per_class_auc(prob["fusion"], y)) - np.nanmean(per_class_auc(prob["global"], y))), None, None

    loaded = load_for_inference(checkpoint, "cpu")
    ops, seen = attended_opacities(loaded, dataset, cfg, batch_size=cfg.train.fusion.batch_size)

    overlay = None
    points = loaded.meta.get("operating_points") or {}
    # Films whose attended box holds their planted small opacity: the only ones a picture of
    # the mechanism may show.
    held = np.zeros(len(preds), dtype=bool)
    held[ops.loc[ops["inside"], "row"].to_numpy(dtype=int)] = True
    has_points = {"global", "fusion"} <= set(points)
    changed = _changed_call(preds, points, labels) is not None if has_points else False
    row = _changed_call(preds, points, labels, eligible=held) if has_points else None
    if row is not None:
        overlay = {"path": out / "overlay_changed_call.png", "image": preds["path"][row],
                   "truth": int(y[row, labels.index("Nodule")]),
                   "global": float(prob["global"][row, labels.index("Nodule")]),
                   "fusion": float(prob["fusion"][row, labels.index("Nodule")]),
                   "threshold_global": float(points["global"][labels.index("Nodule")]),
                   "threshold_fusion": float(points["fusion"][labels.index("Nodule")])}
        _overlay(overlay["path"], loaded, dataset, row, seen["boxes"][row], seen["heatmaps"][row], cfg, "Nodule", overlay["fusion"])
    return {
        "difference": {"fusion_minus_global": diff, "lo": lo, "hi": hi, "n_boot": cfg.train.bootstrap,
                       "patients": int(len(np.unique(groups)))},
        "attended": inside_counts(ops),
        "box_area": box_area(seen["boxes"], cfg.data.image_size),
        "overlay": overlay,
        # A changed call exists, but on no film whose box held its opacity: no picture.
        "changed_elsewhere": bool(changed and row is None),
    }


def run_demo(out_dir: str | Path = "agcnn_demo", *, quick: bool = False, overrides: list[str] | None = None,
             progress: bool = True, say: Callable[[str], None] = print, long: bool = False, seed: int | None = None,
             same_resolution: bool = False, global_from: str | Path | None = None) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the mean AUCs, timings and paths."""
    from agcnn.train.loop import train

    out = Path(out_dir).resolve()
    cfg = demo_config(out, quick, overrides, long=long, seed=seed, same_resolution=same_resolution)
    run_dir = out / "run"
    if global_from is not None:
        source = Path(global_from).resolve()
        cfg = take_global_stage(source, run_dir, cfg)
        say(f"global stage and phantoms: those of {source} (--global-from)")
    resume = _resumable(run_dir, cfg)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from agcnn.data.synthetic import ensure_phantoms

    say(f"phantoms: {cfg.data.synthetic_count} images of {cfg.data.synthetic_size} px in {cfg.data.root}")
    ensure_phantoms(cfg.data.root, count=cfg.data.synthetic_count, size=cfg.data.synthetic_size, seed=cfg.data.synthetic_seed)
    timings["phantoms"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    results = train(cfg, run_dir, resume=resume, progress=progress, say=say)
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    from agcnn.evaluate import evaluate_checkpoint

    best = results["fusion"].best_path
    report = evaluate_checkpoint(best, split="test", out_dir=out / "evaluation", device=cfg.train.device,
                                 batch_size=cfg.train.fusion.batch_size, num_workers=cfg.data.num_workers,
                                 bootstrap=cfg.train.bootstrap)
    shown = evidence(cfg, best, out / "evaluation", out, report)
    timings["evaluate"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    predicted = None
    samples = _dicom_samples(cfg, out / "dicom_samples", n=4 if quick else 8)
    if samples:
        from agcnn.predict import predict_folder

        summary = predict_folder(best, out / "dicom_samples", out / "predictions", device=cfg.train.device,
                                 batch_size=8, progress=False)
        predicted = summary.line()
    timings["predict"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    result = _result(cfg, out, results, report, shown, predicted=predicted, samples=bool(samples), timings=timings)
    result["long"] = long
    from agcnn.pages import write_report

    printed: list[str] = []
    _print_summary(result, quick, printed.append)  # the page shows what the console shows
    result["paths"]["report"] = write_report(out, kind="demo", notes=printed)
    _print_summary(result, quick, say)
    return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {k: v for key, value in d.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}


def take_global_stage(source: Path, run_dir: Path, cfg: Config) -> Config:
    """``--global-from``: start ``run_dir`` with the phantoms and the global stage of the demo run
    in ``source``, which must differ from ``cfg`` in the local branch's input only (the control
    of the same run); returns ``cfg`` reading those phantoms."""
    from agcnn.train.outputs import write_config
    from agcnn.train.seeds import LOCAL_INPUT

    theirs_path, stage = source / "run" / "config.yaml", source / "run" / "global"
    if not theirs_path.is_file() or not (stage / "last.pt").is_file():
        raise ConfigError(f"--global-from {str(source)!r} holds no demo run with a trained global stage "
                          f"(run/config.yaml, run/global/last.pt); run the demo into it first, or drop --global-from")
    theirs = Config.load(theirs_path).to_dict()
    d = cfg.to_dict()
    d["data"]["root"] = theirs["data"]["root"]
    cfg = Config.from_dict(d)
    # Over the keys of both, so that a mapping (data.label_map) set on one side only counts too.
    a, b = _flat(theirs), _flat(d)
    differ = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys())
              if a.get(k) != b.get(k) and k not in LOCAL_INPUT]
    if differ:
        raise ConfigError(f"--global-from {str(source)!r} was run with other settings ({'; '.join(differ)}); pass the "
                          f"same --long / --seed / --set values as that run, so that only the local input differs")
    if not (run_dir / "global" / "last.pt").is_file():
        shutil.copytree(stage, run_dir / "global", dirs_exist_ok=True)
        write_config(run_dir, cfg)
    return cfg


def _resumable(run_dir: Path, cfg: Config) -> bool:
    """Re-running the demo into the same folder continues (or skips) the stages it finished; a
    folder trained with other settings is not mixed in."""
    if not (run_dir / "config.yaml").is_file():
        return False
    if Config.load(run_dir / "config.yaml").to_dict() != cfg.to_dict():
        raise ConfigError(f"{str(run_dir)!r} holds a demo run with other settings (e.g. --quick or not); "
                          f"pass another --out or delete that folder")
    return True


def _result(cfg: Config, out: Path, results: dict[str, Any], report: dict[str, Any], shown: dict[str, Any], *,
            predicted: str | None, samples: bool, timings: dict[str, float]) -> dict[str, Any]:
    """What run_demo returns and prints: mean AUCs, the evidence, timings and every path written."""
    run_dir = out / "run"
    branches = report["branches"]
    means = {b: branches[b].get("mean_auc") for b in ("global", "local", "fusion")}
    result = {
        "mean_auc": means,
        "ci": {b: branches[b].get("mean_ci") for b in means},
        "per_class": {b: branches[b].get("auc") for b in means},
        "n_test": report["n_images"],
        "seed": cfg.data.synthetic_seed,
        "same_resolution": cfg.data.highres_size == cfg.data.image_size,
        "val_best": {s: r.best_metric for s, r in results.items()},
        "seconds": timings,
        "paths": {
            "phantoms": Path(cfg.data.root),
            "config": run_dir / "config.yaml",
            **{f"{s} checkpoint": r.best_path for s, r in results.items()},
            "training logs": run_dir / "<stage>" / "log.csv",
            "tensorboard": run_dir / "tb",
            "evaluation": out / "evaluation",
            **({"dicom samples": out / "dicom_samples", "predictions": out / "predictions"} if samples else {}),
        },
        "predict": predicted,
        **shown,
    }
    if shown["overlay"]:
        result["paths"]["overlay"] = shown["overlay"]["path"]
    return result


def not_shown(difference: dict[str, Any], attended: dict[str, tuple[int, int]]) -> list[str]:
    """Why a run's own numbers do not show the mechanism (empty when they do): the paired
    interval of fusion - global reaches 0 (or lies below it), or the box holds under half of the nodules."""
    why = []
    lo, hi = difference.get("lo"), difference.get("hi")
    if lo is None:
        why.append("no paired interval (train.bootstrap=0)")
    elif lo <= 0:
        where = "lies below 0: fusion is worse" if hi < 0 else "reaches 0"
        why.append(f"the paired interval of fusion - global, {lo:+.3f} to {hi:+.3f}, {where}")
    inside, n = attended.get("nodule", (0, 0))
    if n == 0 or inside < HELD_SHARE * n:
        why.append(f"the attended box holds {inside} of {n} nodules")
    return why


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def _print_summary(r: dict[str, Any], quick: bool, say: Callable[[str], None]) -> None:
    say("")
    control = ", local input cropped from the global input (control)" if r.get("same_resolution") else ""
    say(f"AG-CNN demo{' (--quick: numbers are meaningless)' if quick else ''}: test split, {r['n_test']} images, "
        f"phantom seed {r.get('seed', 0)}{control}")
    findings = [n for n, v in (r["per_class"]["fusion"] or {}).items() if v is not None]
    say(f"{'branch':<8} {'mean AUC':>9} {'95% CI':>15}  " + " ".join(f"{n[:12]:>12}" for n in findings))
    for b in ("global", "local", "fusion"):
        ci = r["ci"][b] or [None, None]
        ci_s = f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci[0] is not None else "-"
        per = r["per_class"][b] or {}
        say(f"{b:<8} {_fmt(r['mean_auc'][b]):>9} {ci_s:>15}  " + " ".join(f"{_fmt(per.get(n)):>12}" for n in findings))
    d = r["difference"]
    if d["lo"] is None:
        say(f"fusion - global mean AUC: {d['fusion_minus_global']:+.3f} (no interval: train.bootstrap=0)")
    else:
        say(f"fusion - global mean AUC: {d['fusion_minus_global']:+.3f}, 95% paired bootstrap interval "
            f"{d['lo']:+.3f} to {d['hi']:+.3f} ({d['n_boot']} resamples of the {d['patients']} test patients)")
    att = r["attended"]
    if att:
        parts = [f"{k} {i} of {n} ({100 * i / n:.0f}%)" for k, (i, n) in sorted(att.items(), key=lambda kv: kv[0] != "nodule")]
        say(f"attended box (mean {100 * r['box_area']:.0f}% of the image) holds the centre of the planted small opacity: "
            + ", ".join(parts))
    o = r["overlay"]
    if o:
        truth = "a nodule" if o["truth"] else "a look-alike, no nodule"
        say(f"local branch changed the call on {o['image']} ({truth}): Nodule probability global {o['global']:.3f} "
            f"(operating point {o['threshold_global']:.3f}), fusion {o['fusion']:.3f} (operating point "
            f"{o['threshold_fusion']:.3f}), {o['fusion'] - o['global']:+.3f}; picture: {o['path']}")
    elif r.get("changed_elsewhere"):
        say("local branch changed Nodule calls on the test split, but on no film whose attended box held its small "
            "opacity: no picture")
    else:
        say("local branch changed no Nodule call on the test split (at the validation operating points)")
    why = not_shown(r["difference"], r["attended"])
    if why:
        say(f"This run does not show the attention mechanism at work ({'; '.join(why)}). " + (
            f"{LONG_RECORD}." if r.get("long") else f"`{LONG_COMMAND}` ({LONG_TIME}) trains longer on more films; {LONG_RECORD}."))
    s = r["seconds"]
    say(f"time: {s['total']:.0f} s (phantoms {s['phantoms']:.0f}, training {s['train']:.0f}, "
        f"evaluation {s['evaluate']:.0f}, prediction {s['predict']:.0f})")
    if r["predict"]:
        say(r["predict"])
    say("written:")
    for name, p in r["paths"].items():
        say(f"  {name:<18} {p}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="agcnn_demo", help="folder for phantoms, run, evaluation, predictions (default ./agcnn_demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (under a minute) that checks the installation")
    parser.add_argument("--long", action="store_true", help=f"three times the phantoms, twice the global epochs ({LONG_TIME})")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="phantom seed (data.synthetic_seed, default that of the demo config: 0): another phantom set")
    parser.add_argument("--control-same-resolution", action="store_true",
                        help="the control run: crop the local input from the global input itself, as the paper does "
                             "(data.highres_size = data.image_size), instead of from the 512 px copy")
    parser.add_argument("--global-from", metavar="DIR", default=None,
                        help="take the phantoms and the trained global stage of the demo run in DIR (its --out), which "
                             "must have the same settings but the local input: the control of that very run, in a "
                             "third of its time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the demo config, e.g. --set train.device=cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, overrides=args.overrides, progress=not args.no_progress, long=args.long,
             seed=args.seed, same_resolution=args.control_same_resolution, global_from=args.global_from)
    return 0
