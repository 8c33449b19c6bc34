"""``agcnn prepare``: decode every image of the configured data set once into ``data.cache``.

    agcnn prepare --config configs/nih.yaml [--set data.cache=/fast/disk/nih512] [--workers 8]

For ChestX-ray14 without ``data.cache`` the cache goes to ``<data.root>/agcnn-cache-<cache_size>``,
where training looks for it by default.

Rerunning continues an interrupted run, leaves an up-to-date cache alone and rebuilds one that
no longer matches the table. Files that cannot be decoded are listed (and kept in
``unusable.csv`` in the cache); the exit status is 1 when there are any, so a pipeline notices.
"""

from __future__ import annotations

import argparse
import sys

EXIT_UNUSABLE = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration (data.cache must be set, here or with --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. data.cache=cache/nih512 (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: data.num_workers)")
    parser.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8",
                        help="stored grey levels: uint8 (ChestX-ray14 PNGs are 8-bit) or uint16 for 12-16 bit DICOM (twice the disk)")
    parser.add_argument("--max-images", type=int, default=None, help="stop after this many images; rerun to continue")


def run(args: argparse.Namespace) -> int:
    from agcnn.config import Config
    from agcnn.errors import ConfigError
    from agcnn.data.cache import build_cache, cache_folder
    from agcnn.data.datasets import load_dataframe, scope_policy
    from agcnn.runtime import loader_workers

    cfg = Config.load(args.config, args.overrides)
    folder = cache_folder(cfg.data)
    if folder is None:
        raise ConfigError("data.cache is not set; give the cache folder in the config or with --set data.cache=PATH")
    table = load_dataframe(cfg)
    workers = cfg.data.num_workers if args.workers is None else args.workers
    workers = loader_workers(max(0, workers), "--workers" if args.workers is not None else "data.num_workers")
    report = build_cache(folder, table["path"].tolist(), cfg.data.root, size=cfg.data.cache_size,
                         dtype=args.dtype, workers=workers, max_images=args.max_images, scope=scope_policy(cfg.data))
    rate = report.decoded / report.seconds if report.seconds else 0.0
    state = "complete" if report.complete else f"incomplete (rerun `agcnn prepare` to continue; {report.count - report.reused - report.decoded} left)"
    print(f"cache {report.path}: {report.count} images, {report.decoded} decoded now ({rate:.0f}/s), "
          f"{report.reused} reused; {state}")
    if report.unusable:
        print(f"{len(report.unusable)} images could not be decoded (listed in {report.path}/unusable.csv); "
              f"`agcnn train` refuses to start while they are listed: fix the files or remove them from the table, "
              f"or leave them out with data.skip_unreadable=true", file=sys.stderr)
        for path, reason in report.unusable[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        return EXIT_UNUSABLE
    return 0
