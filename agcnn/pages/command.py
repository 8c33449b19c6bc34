"""``agcnn report DIR``: write ``DIR/report.html`` for an evaluate, predict, localize or demo folder."""

from __future__ import annotations

import argparse

from agcnn.errors import UsageError
from agcnn.pages import KINDS, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="the --out folder of agcnn evaluate, predict, localize or demo")
    parser.add_argument("--kind", choices=KINDS, default=None, help="the folder's kind (default: read from its files)")
    parser.add_argument("--cases", type=int, default=2, metavar="N",
                        help="evaluate: per finding the N surest true positives, false positives and false negatives, "
                             "drawn from the checkpoint and the images (default 2; 0 = none)")
    parser.add_argument("--gallery", type=int, default=60, metavar="N",
                        help="predict: at most N overlays embedded in the gallery (default 60; the rest stay linked)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="evaluate: where the evaluated images are now, if not at the run's data.root")


def run(args: argparse.Namespace) -> int:
    if args.cases < 0 or args.gallery < 0:
        raise UsageError(f"--cases ({args.cases}) and --gallery ({args.gallery}) must be 0 or more")
    path = write_report(args.folder, kind=args.kind, cases=args.cases, gallery=args.gallery, data_root=args.data_root)
    print(f"report written to {path}")
    return 0
