"""The DICOM libraries' own messages, kept from the console and logs and counted by kind.

pydicom, highdicom and pynetdicom report through :mod:`logging` and :mod:`warnings`, and their
messages quote what they are about: highdicom warns that a patient's name "is unlikely to represent the
intended person name" with the name in it, logs "copy Patient-related attributes from dataset
<SOP Instance UID>", pydicom logs a decoder's traceback or "End of file reached ... in file
<name>", pynetdicom logs the traceback of a data set it failed to encode. Container and scheduler logs are kept in hospitals, so none of this may reach them.

:func:`installed` routes these libraries' log records and warnings into a :class:`Tally`:
counts by *kind* -- the library, the level or warning category, and the place in the library's
code that emitted it, never the message -- each with the relative paths of the first files
that caused it. :func:`for_file` counts everything a block emits (any library, any warning)
against one input file. ``debug=True`` (``agcnn --debug``) shows the messages as well.

Standard library only, so every module may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["LOGGERS", "Tally", "installed", "for_file", "current", "debug_enabled", "report"]

# Loggers whose records are counted instead of shown; warnings whose code lives in these
# packages likewise. A module that uses another DICOM library adds it here.
LOGGERS = ("pydicom", "highdicom", "pynetdicom")
WARNING_PACKAGES = ("pydicom", "highdicom", "gdcm", "pylibjpeg", "openjpeg", "rle", "jpeg_ls", "pynetdicom")
FILES_PER_KIND = 3  # relative paths kept per kind: enough to find the files, not a second table


@dataclass
class Tally:
    """Library messages by kind, with the first files (relative paths) that caused each."""

    counts: Counter = field(default_factory=Counter)
    files: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kinds: Mapping[str, int], rel: str | None = None) -> None:
        for kind, n in kinds.items():
            self.counts[kind] += n
            if rel is not None:
                seen = self.files.setdefault(kind, [])
                if len(seen) < FILES_PER_KIND and rel not in seen:
                    seen.append(rel)

    def as_dict(self) -> dict[str, dict]:
        """For a manifest: ``{kind: {"count": n, "files": [first relative paths]}}``."""
        return {k: {"count": n, "files": list(self.files.get(k, []))} for k, n in sorted(self.counts.items())}

    def lines(self) -> list[str]:
        """One line per kind, most frequent first, naming the first files; no message text."""
        out = []
        for kind, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            where = self.files.get(kind)
            out.append(f"{n} x {kind}" + (f", first in {', '.join(where)}" if where else ""))
        return out


@dataclass
class _State:
    tally: Tally
    debug: bool
    handler: logging.Handler
    saved: dict[str, tuple[bool, int]]
    showwarning: object


_state: _State | None = None
# The innermost for_file block of this context: (relative path, its counter).
_block: ContextVar[tuple[str, Counter] | None] = ContextVar("agcnn_libmessages_block", default=None)


def _count(kind: str) -> None:
    block = _block.get()
    if block is not None:
        block[1][kind] += 1
    elif _state is not None:
        _state.tally.add({kind: 1})


class _CountingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _count(log_kind(record))


def log_kind(record: logging.LogRecord) -> str:
    """``"highdicom INFO (base._copy_root_attributes_of_module)"``: where, never what."""
    return f"{record.name.split('.')[0]} {record.levelname} ({record.module}.{record.funcName})"


def warning_kind(category: type[Warning], filename: str, lineno: int) -> str:
    """``"highdicom UserWarning (highdicom/sc/sop.py:222)"``: the path below site-packages."""
    parts = os.path.normpath(filename).split(os.sep)
    for i, part in enumerate(parts):
        if part in ("site-packages", "dist-packages"):
            parts = parts[i + 1 :]
            break
    else:
        parts = parts[-2:]
    package = parts[0].removesuffix(".py") if parts else "?"
    return f"{package} {category.__name__} ({'/'.join(parts)}:{lineno})"


def _from_library(filename: str) -> bool:
    parts = os.path.normpath(filename).split(os.sep)
    return any(p in WARNING_PACKAGES for p in parts)


def _showwarning(message, category, filename, lineno, file=None, line=None):
    if not _from_library(filename) and _block.get() is None:
        return _state.showwarning(message, category, filename, lineno, file, line)
    _count(warning_kind(category, filename, lineno))
    if _state.debug:
        _state.showwarning(message, category, filename, lineno, file, line)


def current() -> Tally | None:
    """The tally of this process, while :func:`installed` is active."""
    return _state.tally if _state is not None else None


def debug_enabled() -> bool:
    return _state is not None and _state.debug


@contextlib.contextmanager
def installed(debug: bool = False) -> Iterator[Tally]:
    """Count the libraries' log records and warnings for the duration of the block.

    Re-entrant: an inner block (``predict()`` under ``agcnn predict``) shares the outer one's
    tally. The loggers' records do not reach the root handlers (the console) unless ``debug``.
    """
    global _state
    if _state is not None:
        yield _state.tally
        return
    handler = _CountingHandler(level=logging.INFO)
    saved = {}
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.propagate, lg.level)
        lg.addHandler(handler)
        lg.propagate = debug
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            # INFO and up are counted whatever the root logger's level.
            lg.setLevel(logging.INFO)
    _state = _State(Tally(), debug, handler, saved, warnings.showwarning)
    warnings.showwarning = _showwarning
    try:
        yield _state.tally
    finally:
        warnings.showwarning = _state.showwarning
        for name, (propagate, level) in saved.items():
            lg = logging.getLogger(name)
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level
        _state = None


def report(prefix: str, tally: Tally | None = None) -> None:
    """Print the counts on stderr (``prefix: N messages ...`` and a line per kind), then clear them.

    A command calls it before its own last line; :func:`agcnn.cli.main` calls it again at the
    end for whatever came after.
    """
    tally = tally if tally is not None else current()
    if tally is None or not tally.counts:
        return
    shown = "shown above" if debug_enabled() else "not shown: they can quote header values; --debug shows them"
    print(f"{prefix}: {sum(tally.counts.values())} messages of the DICOM libraries ({shown}):", file=sys.stderr)
    for line in tally.lines():
        print(f"  {line}", file=sys.stderr)
    tally.counts.clear()
    tally.files.clear()


@contextlib.contextmanager
def for_file(rel: str, *, merge: bool = True, native: bool = False) -> Iterator[Counter]:
    """Count every warning (any origin) and library log record of the block against ``rel``.

    Yields the block's counter. ``merge``: also add it to this process's tally at the end;
    False where the counts travel with a record to another process (the loader's workers).
    ``native``: also keep what native code writes to the process's stderr (file descriptor 2)
    during the block -- a codec's panic message and backtrace, a C++ library's warnings -- and
    count it as one message. Outside :func:`installed` the block's warnings are still counted
    and kept from the console.
    """
    counter: Counter = Counter()
    token = _block.set((rel, counter))
    try:
        with warnings.catch_warnings(record=True) as caught, _native_stderr(native) as written:
            warnings.simplefilter("always")
            yield counter
        if written:
            counter[_native_kind(written)] += 1
            if debug_enabled():
                sys.stderr.write("".join(written))
        for w in caught:
            counter[warning_kind(w.category, w.filename, w.lineno)] += 1
            if debug_enabled():
                print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno), end="", file=sys.stderr)
    finally:
        _block.reset(token)
        if merge and _state is not None and counter:
            _state.tally.add(counter, rel)


@contextlib.contextmanager
def _native_stderr(enabled: bool) -> Iterator[list[str]]:
    """Point file descriptor 2 at a scratch file for the block; yields a list that then holds
    what was written (empty when nothing was). Python's ``sys.stderr`` is flushed around it."""
    out: list[str] = []
    if not enabled:
        yield out
        return
    scratch = _scratch_file()
    scratch.seek(0)
    scratch.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(scratch.fileno(), 2)
        yield out
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        scratch.seek(0)
        text = scratch.read().decode("utf-8", "replace")
        if text:
            out.append(text)


_scratch = None


def _scratch_file():
    global _scratch
    if _scratch is None or _scratch.closed:
        import atexit
        import tempfile

        _scratch = tempfile.TemporaryFile()
        atexit.register(_scratch.close)
    return _scratch


def _native_kind(written: list[str]) -> str:
    text = "".join(written)
    # Which native code wrote it can be told apart without quoting it: the text may hold values.
    what = "a Rust panic" if "panicked at" in text else "native code"
    return f"stderr output of {what}"
