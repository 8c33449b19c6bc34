"""The errors agcnn reports to its user, each carrying the exit status of the command that meets it.

``agcnn.cli.main`` catches :class:`AgcnnError` once, for every command: one line on stderr
(``agcnn COMMAND: error: MESSAGE``), no traceback, and the class's ``exit_code``. With
``agcnn --debug COMMAND`` or ``AGCNN_DEBUG=1`` the traceback is shown instead. Library callers
catch the same classes; each also derives from the built-in exception it replaced
(``ConfigError`` is a ``ValueError``, ...), so older ``except`` clauses keep working.

Exit statuses, the same in every command:

* 0 -- done.
* 1 -- the command ran and failed part-way (a file that could not be decoded mid-run, some
  files of a batch failed).
* 2 -- usage, configuration or input error, found before any work; nothing was written.

This module imports nothing from agcnn: every other module may import it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class AgcnnError(Exception):
    """Base of every error agcnn reports to a user; the message names the value and the fix."""

    exit_code: int = EXIT_FAILED


class UsageError(AgcnnError):
    """A problem with the command line, its options or the folders it names."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A configuration value or key is not valid; the message names it and the fix."""


class CheckpointError(AgcnnError, ValueError):
    """A checkpoint file is missing, unreadable, or not an agcnn checkpoint; the message says which."""

    exit_code = EXIT_USAGE


class DataError(AgcnnError, ValueError):
    """The input data cannot be used as given (a table, its image files, a cache).

    Found before training or evaluation starts, so the command exits 2 with nothing done.
    """

    exit_code = EXIT_USAGE


class MissingFileError(DataError, FileNotFoundError):
    """A file that the configuration or the data table names does not exist."""
