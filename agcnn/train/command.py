"""``agcnn train``: the command-line arguments and the exit status; :func:`agcnn.train.loop.train` does the work."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from agcnn.config import Config
from agcnn.errors import ConfigError
from agcnn.stages import STAGES
from agcnn.train.loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/); with --resume, defaults to RUN_DIR/config.yaml")
    parser.add_argument("--stage", default="all", choices=(*STAGES, "all"),
                        help="which stage to train; 'all' runs global, local, fusion in order (default)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: config.yaml, tb/, <stage>/best.pt ...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.global.epochs=5 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/<stage>/last.pt; completed stages are skipped")
    parser.add_argument("--seed-from", metavar="CKPT",
                        help="initialise the (single) stage from this checkpoint instead of RUN_DIR/<previous>/best.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (epoch summaries still print)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.out)
    config = args.config
    if config is None:
        if not args.resume:
            raise ConfigError("--config is required (e.g. --config configs/agcnn_r50.yaml); only --resume can take it "
                              "from RUN_DIR/config.yaml")
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"--resume without --config reads {str(config)!r}, which does not exist; pass --config")
    cfg = Config.load(config, args.overrides)
    stages = tuple(STAGES) if args.stage == "all" else (args.stage,)
    try:
        results = train(cfg, run_dir, stages, resume=args.resume, seed_from=args.seed_from, progress=not args.no_progress)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        for r in results.values():
            print(f"{r.stage}: best val mean AUC {r.best_metric:.4f} at epoch {r.best_epoch} -> {r.best_path}")
    return 0
