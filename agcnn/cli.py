"""The ``agcnn`` command: a thin shell over library functions.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``agcnn --help``
stays fast and one broken optional dependency cannot take down the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from agcnn import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("agcnn.demo", "generate phantoms, train the three stages on CPU, evaluate and predict"),
    "train": ("agcnn.train", "train the global, local and fusion stages"),
    "evaluate": ("agcnn.evaluate", "per-class AUC with confidence intervals for each branch"),
    "predict": ("agcnn.predict.command", "batch inference over a folder of DICOM / PNG / JPEG files"),
    "merge": ("agcnn.predict.merge", "merge the shares of a sharded predict run"),
    "prepare": ("agcnn.data.prepare", "decode and resize every image once into a training cache"),
    "phantoms": ("agcnn.data.synthetic", "write a generated phantom data set (PNG, DICOM, labels CSV)"),
}

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agcnn",
        description="Attention-guided CNN (AG-CNN) for the 14 ChestX-ray14 findings.",
    )
    parser.add_argument("--version", action="version", version=f"agcnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "_missing", False):
        parser.error(f"the {args.command!r} command is not available in this installation")
    from agcnn.config import ConfigError

    mod = importlib.import_module(args._module)
    # Library modules log through `logging`; the command line shows INFO and up, bare, unless
    # the command declares its own level (the demo prints its own summary: warnings only).
    logging.basicConfig(level=getattr(mod, "LOG_LEVEL", logging.INFO), format="%(message)s")
    try:
        return int(mod.run(args) or 0)
    except ConfigError as e:
        print(f"agcnn {args.command}: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
