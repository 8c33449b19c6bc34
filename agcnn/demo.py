"""``agcnn demo``: the whole pipeline on generated phantoms, on a CPU, from any folder.

1. generate the phantom set (``agcnn.data.synthetic``) under ``OUT/phantoms``;
2. train the global, local and fusion stages (``agcnn.train``) into ``OUT/run`` with the
   configuration shipped inside the package (``agcnn/configs/demo.yaml``);
3. evaluate the fusion checkpoint on the held-out test split (``agcnn.evaluate``);
4. predict a few of the generated DICOM files (``agcnn.predict``);
5. print global / local / fusion mean AUC and every path written.

``--quick`` shrinks everything (a few dozen small phantoms, one epoch per stage) to check the
installation in well under a minute; its numbers mean nothing.
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

import pandas as pd

from agcnn.config import Config, ConfigError

DEMO_CONFIG = "demo.yaml"

# The quick variant: tiny images and one epoch per stage.
QUICK = [
    "data.synthetic_count=48", "data.synthetic_size=64", "data.resize=32", "data.image_size=32",
    "data.highres_size=64", "model.local_size=32", "data.num_workers=0",
    "train.global.epochs=1", "train.local.epochs=1", "train.fusion.epochs=2",
    "train.global.batch_size=8", "train.local.batch_size=8", "train.fusion.batch_size=8",
    "train.bootstrap=0",
]

# The demo prints its own summary; library INFO lines would only interleave with it.
LOG_LEVEL = logging.WARNING


def demo_config_path() -> Path:
    """The demo configuration shipped as package data."""
    return Path(str(resources.files("agcnn") / "configs" / DEMO_CONFIG))


def demo_config(out: Path, quick: bool = False, overrides: list[str] | None = None) -> Config:
    return Config.load(demo_config_path(), [f"data.root={out / 'phantoms'}", *(QUICK if quick else []), *(overrides or [])])


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


def run_demo(out_dir: str | Path = "agcnn_demo", *, quick: bool = False, overrides: list[str] | None = None,
             progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the mean AUCs, timings and paths."""
    from agcnn.train import train

    out = Path(out_dir).resolve()
    cfg = demo_config(out, quick, overrides)
    run_dir = out / "run"
    # Re-running the demo into the same folder continues (or skips) the stages it finished; a
    # folder trained with other settings is not mixed in.
    resume = False
    if (run_dir / "config.yaml").is_file():
        if Config.load(run_dir / "config.yaml").to_dict() != cfg.to_dict():
            raise ConfigError(f"{str(run_dir)!r} holds a demo run with other settings (e.g. --quick or not); "
                              f"pass another --out or delete that folder")
        resume = True

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

    branches = report["branches"]
    means = {b: branches[b].get("mean_auc") for b in ("global", "local", "fusion")}
    result = {
        "mean_auc": means,
        "ci": {b: branches[b].get("mean_ci") for b in means},
        "per_class": {b: branches[b].get("auc") for b in means},
        "n_test": report["n_images"],
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
    }
    _print_summary(result, quick, say)
    return result


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def _print_summary(r: dict[str, Any], quick: bool, say: Callable[[str], None]) -> None:
    say("")
    say(f"AG-CNN demo{' (--quick: numbers are meaningless)' if quick else ''}: test split, {r['n_test']} images")
    findings = [n for n, v in (r["per_class"]["fusion"] or {}).items() if v is not None]
    say(f"{'branch':<8} {'mean AUC':>9} {'95% CI':>15}  " + " ".join(f"{n[:12]:>12}" for n in findings))
    for b in ("global", "local", "fusion"):
        ci = r["ci"][b] or [None, None]
        ci_s = f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci[0] is not None else "-"
        per = r["per_class"][b] or {}
        say(f"{b:<8} {_fmt(r['mean_auc'][b]):>9} {ci_s:>15}  " + " ".join(f"{_fmt(per.get(n)):>12}" for n in findings))
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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the demo config, e.g. --set train.device=cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, overrides=args.overrides, progress=not args.no_progress)
    return 0
