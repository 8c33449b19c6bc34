"""The ``agcnn`` command: a thin shell over library functions.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. A command is one row of :data:`COMMANDS`; its module is imported only
when that command runs (or shows its ``--help``), so ``agcnn --help`` stays fast and one broken
optional dependency cannot take down the others.

Errors: every :class:`agcnn.errors.AgcnnError` that reaches :func:`main` becomes one line on
stderr and the exit status its class carries (2: usage, configuration or input error, nothing
done; 1: failed part-way). ``agcnn --debug COMMAND ...`` or ``AGCNN_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from agcnn import __version__
from agcnn.errors import EXIT_FAILED, EXIT_USAGE, AgcnnError

# name -> (module, one-line help). A new command is one row here and a module with
# add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("agcnn.demo", "generate phantoms, train the three stages on CPU, evaluate and predict"),
    "train": ("agcnn.train.command", "train the global, local and fusion stages"),
    "evaluate": ("agcnn.evaluate", "per-class AUC with confidence intervals for each branch"),
    "calibrate": ("agcnn.calibrate", "fit a monotone probability map per finding on labelled data; new operating points"),
    "predict": ("agcnn.predict.command", "batch inference over a folder of DICOM / PNG / JPEG files"),
    "localize": ("agcnn.localize", "score the attended box and each branch's CAM against ground-truth boxes"),
    "merge": ("agcnn.predict.merge", "merge the shares of a sharded predict run"),
    "prepare": ("agcnn.data.prepare", "decode and resize every image once into a training cache"),
    "phantoms": ("agcnn.data.synthetic", "write a generated phantom data set (PNG, DICOM, labels CSV)"),
}

DEBUG_ENV = "AGCNN_DEBUG"
EXIT_INTERRUPTED = 130


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top-level
    options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and the options of ``command`` alone.

    Only ``command``'s module is imported; the others are known by their row in
    :data:`COMMANDS` until they run.
    """
    parser = argparse.ArgumentParser(
        prog="agcnn",
        description="Attention-guided CNN (AG-CNN) for the 14 ChestX-ray14 findings.",
        epilog=f"Exit status: 0 done, 1 failed part-way, 2 usage, configuration or input error (nothing done). "
               f"Errors print one line; --debug or {DEBUG_ENV}=1 shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"agcnn {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != command:
            continue
        # Also after the command (`agcnn train --debug ...`); SUPPRESS keeps a top-level --debug.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "_missing", False):
        parser.error(f"the {args.command!r} command is not available in this installation")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    mod = importlib.import_module(args._module)
    # Library modules log through `logging`; the command line shows INFO and up, bare, unless
    # the command declares its own level (the demo prints its own summary: warnings only).
    logging.basicConfig(level=getattr(mod, "LOG_LEVEL", logging.INFO), format="%(message)s")
    try:
        return int(mod.run(args) or 0)
    except AgcnnError as e:
        if debug:
            raise
        _say(args.command, f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        _say(args.command, "interrupted")
        return EXIT_INTERRUPTED
    except OSError as e:
        # A disk that is full, a folder without write access, a file that went away mid-run:
        # the message names the file; the traceback would only point into our code.
        if debug:
            raise
        _say(args.command, f"error: {e} (run with --debug for the traceback)")
        return EXIT_FAILED


def _say(command: str, text: str) -> None:
    print(f"agcnn {command}: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
