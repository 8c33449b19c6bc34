"""The number types the commands' arguments share: argparse calls them on the text the user gave,
and their errors name the value and the smallest one allowed."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (``meaning`` says what the bound means)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be at least {minimum}{meaning}")
        return v

    return parse


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """An argparse type: a duration in seconds, more than 0 (or 0 and more with ``allow_zero``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text} must be {'0 or more' if allow_zero else 'more than 0'} seconds")
        return v

    return parse
