#!/usr/bin/env python3
"""Compare two ``predictions.csv`` files column by column within a tolerance.

Rows are matched by a key column (``path`` by default); the compared columns are, unless
``--columns`` names them, every column of the reference whose name starts with one of the
``--prefix`` values (``p_`` by default) or is one of the ``--labels`` (the 14 ChestX-ray14
findings by default). Both files must hold the same keys and the selected columns.

The same image read on two machines (say the host and a container) is written under two
different roots; ``--ref-root`` / ``--cand-root`` strip those so that the keys line up:

    python scripts/compare_predictions.py host/predictions.csv container/predictions.csv \\
        --ref-root /data/xrays --cand-root /input --atol 1e-5

Two runs of ``agcnn predict`` (``--statuses``) must first end the same way: the same status
(``ok`` / ``skipped`` / ``failed``) and reason code for every file and, when given, the same
exit status (``--ref-exit`` / ``--cand-exit``; a missing ``--ref-exit`` is inferred from the
reference's statuses: 1 when a row failed, else 0, as predict does). Only then are the values
compared, so a folder holding a corrupt file (exit 1 in both runs) is still checked:

    python scripts/compare_predictions.py host/predictions.csv container/predictions.csv \
        --statuses --cand-exit 1 --ref-root /data/xrays --cand-root /input

Exit status: 0 when every value agrees, 1 on any difference, 2 when the files cannot be
compared (missing file, key or column, duplicate keys, nothing selected).

Runs with the Python that has agcnn installed (for its label list).
"""

from __future__ import annotations

import argparse
import csv
import math
import posixpath
import sys
from collections.abc import Sequence

from agcnn.labels import LABELS

# The label contract: compared by default, in the order predict writes them.
DEFAULT_LABELS: tuple[str, ...] = LABELS

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_UNUSABLE = 2


class Unusable(Exception):
    """The two files cannot be compared at all."""


def select_columns(
    header: Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    prefixes: Sequence[str] = ("p_",),
    labels: Sequence[str] = DEFAULT_LABELS,
) -> list[str]:
    """The columns of ``header`` to compare: ``columns`` verbatim, else prefix or label matches."""
    if columns:
        missing = [c for c in columns if c not in header]
        if missing:
            raise Unusable(f"requested columns not in the reference: {missing}; it has {list(header)}")
        return list(columns)
    label_set = set(labels)
    return [c for c in header if c in label_set or any(c.startswith(p) for p in prefixes if p)]


def _norm_key(value: str, root: str | None) -> str:
    value = value.strip()
    if root:
        root_n = posixpath.normpath(root.replace("\\", "/"))
        val_n = posixpath.normpath(value.replace("\\", "/"))
        if val_n == root_n or val_n.startswith(root_n.rstrip("/") + "/"):
            return posixpath.relpath(val_n, root_n)
    return value


def read_table(path: str, key: str, root: str | None = None) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Header and rows keyed by ``key`` (after stripping ``root``); refuses duplicate keys."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if key not in header:
                raise Unusable(f"{path}: no key column {key!r}; columns are {header}")
            rows: dict[str, dict[str, str]] = {}
            for line_no, row in enumerate(reader, start=2):
                k = _norm_key(row[key] or "", root)
                if k in rows:
                    raise Unusable(f"{path}:{line_no}: duplicate key {k!r}")
                rows[k] = row
    except OSError as e:
        raise Unusable(f"cannot read {path}: {e}") from e
    return header, rows


def _parse(value: str | None) -> float | None:
    """A float, or None for an empty cell; raises ValueError on text."""
    if value is None or value.strip() == "":
        return None
    return float(value)


def compare(
    ref_path: str,
    cand_path: str,
    *,
    key: str = "path",
    atol: float = 1e-5,
    columns: Sequence[str] | None = None,
    prefixes: Sequence[str] = ("p_",),
    labels: Sequence[str] = DEFAULT_LABELS,
    ref_root: str | None = None,
    cand_root: str | None = None,
    statuses: bool = False,
    ref_exit: int | None = None,
    cand_exit: int | None = None,
) -> tuple[list[str], dict]:
    """Compare the files; returns (differences as readable lines, summary).

    With ``statuses`` (or an exit status given), the runs must end the same way before any
    value is compared: a difference there is the only thing reported.
    """
    ref_header, ref_rows = read_table(ref_path, key, ref_root)
    cand_header, cand_rows = read_table(cand_path, key, cand_root)
    if statuses or ref_exit is not None or cand_exit is not None:
        ending = compare_endings(ref_header, ref_rows, cand_header, cand_rows, ref_exit=ref_exit, cand_exit=cand_exit)
        if ending:
            return ending, {"rows": 0, "columns": [], "values": 0, "max_abs_diff": {}}
    selected = [c for c in select_columns(ref_header, columns=columns, prefixes=prefixes, labels=labels) if c != key]
    if not selected:
        raise Unusable(
            f"no column of {ref_path} matches prefixes {list(prefixes)} or the labels; "
            f"columns are {ref_header} (use --columns)"
        )
    missing_cols = [c for c in selected if c not in cand_header]
    if missing_cols:
        raise Unusable(f"{cand_path} lacks the columns {missing_cols}")

    problems: list[str] = []
    only_ref = sorted(set(ref_rows) - set(cand_rows))
    only_cand = sorted(set(cand_rows) - set(ref_rows))
    for k in only_ref:
        problems.append(f"row {k!r}: only in the reference")
    for k in only_cand:
        problems.append(f"row {k!r}: only in the candidate")

    max_diff = {c: 0.0 for c in selected}
    n_values = 0
    for k in sorted(set(ref_rows) & set(cand_rows)):
        for c in selected:
            a_s, b_s = ref_rows[k].get(c), cand_rows[k].get(c)
            try:
                a, b = _parse(a_s), _parse(b_s)
            except ValueError:
                problems.append(f"row {k!r} column {c!r}: not numbers: {a_s!r} vs {b_s!r}")
                continue
            n_values += 1
            if a is None or b is None:
                if a is not b:
                    problems.append(f"row {k!r} column {c!r}: {a_s!r} vs {b_s!r} (one empty)")
                continue
            if math.isnan(a) or math.isnan(b):
                if not (math.isnan(a) and math.isnan(b)):
                    problems.append(f"row {k!r} column {c!r}: {a!r} vs {b!r} (one NaN)")
                continue
            d = abs(a - b)
            if math.isinf(a) or math.isinf(b):
                d = 0.0 if a == b else math.inf
            max_diff[c] = max(max_diff[c], d)
            if d > atol:
                problems.append(f"row {k!r} column {c!r}: {a!r} vs {b!r} (|diff| {d:.3g} > {atol:g})")
    summary = {
        "rows": len(set(ref_rows) & set(cand_rows)),
        "columns": selected,
        "values": n_values,
        "max_abs_diff": max_diff,
    }
    return problems, summary


def _status(row: dict[str, str]) -> tuple[str, str]:
    """(status, reason code) of a predictions.csv row."""
    return (row.get("status") or "").strip(), (row.get("reason") or "").split(":", 1)[0].strip()


def compare_endings(
    ref_header: Sequence[str],
    ref_rows: dict[str, dict[str, str]],
    cand_header: Sequence[str],
    cand_rows: dict[str, dict[str, str]],
    *,
    ref_exit: int | None = None,
    cand_exit: int | None = None,
) -> list[str]:
    """Differences in how two predict runs ended: exit status, rows, status and reason per file."""
    for name, header in (("reference", ref_header), ("candidate", cand_header)):
        if "status" not in header:
            raise Unusable(f"the {name} has no 'status' column; it is not a predictions.csv of `agcnn predict`")
    problems: list[str] = []
    if ref_exit is None and cand_exit is not None:
        ref_exit = 1 if any(_status(r)[0] == "failed" for r in ref_rows.values()) else 0
    if ref_exit is not None and cand_exit is not None and ref_exit != cand_exit:
        problems.append(f"exit status: {ref_exit} in the reference run, {cand_exit} in the candidate run")
    for k in sorted(set(ref_rows) - set(cand_rows)):
        problems.append(f"row {k!r}: only in the reference")
    for k in sorted(set(cand_rows) - set(ref_rows)):
        problems.append(f"row {k!r}: only in the candidate")
    for k in sorted(set(ref_rows) & set(cand_rows)):
        a, b = _status(ref_rows[k]), _status(cand_rows[k])
        if a != b:
            problems.append(f"row {k!r}: {' '.join(filter(None, a))} vs {' '.join(filter(None, b))}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="reference CSV (e.g. the host run)")
    ap.add_argument("candidate", help="CSV to check (e.g. the container run)")
    ap.add_argument("--key", default="path", help="column that identifies a row (default: path)")
    ap.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default: 1e-5)")
    ap.add_argument("--columns", help="comma-separated columns to compare (overrides --prefix/--labels)")
    ap.add_argument(
        "--prefix",
        action="append",
        dest="prefixes",
        help="compare columns starting with this (repeatable; default: p_)",
    )
    ap.add_argument(
        "--labels",
        help="comma-separated column names compared as well (default: the 14 findings; '' for none)",
    )
    ap.add_argument("--ref-root", help="root stripped from the reference's keys")
    ap.add_argument("--cand-root", help="root stripped from the candidate's keys")
    ap.add_argument("--statuses", action="store_true",
                    help="first require the same status and reason code per file (predict outputs)")
    ap.add_argument("--ref-exit", type=int, help="exit status of the reference run (default: inferred from its statuses)")
    ap.add_argument("--cand-exit", type=int, help="exit status of the candidate run; implies --statuses")
    ap.add_argument("--max-report", type=int, default=30, help="differences printed at most (default: 30)")
    args = ap.parse_args(argv)

    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    prefixes = args.prefixes if args.prefixes is not None else ["p_"]
    labels = DEFAULT_LABELS if args.labels is None else [c.strip() for c in args.labels.split(",") if c.strip()]
    try:
        problems, summary = compare(
            args.reference,
            args.candidate,
            key=args.key,
            atol=args.atol,
            columns=columns,
            prefixes=prefixes,
            labels=labels,
            ref_root=args.ref_root,
            cand_root=args.cand_root,
            statuses=args.statuses,
            ref_exit=args.ref_exit,
            cand_exit=args.cand_exit,
        )
    except Unusable as e:
        print(f"compare_predictions: {e}", file=sys.stderr)
        return EXIT_UNUSABLE

    worst = max(summary["max_abs_diff"].values(), default=0.0)
    head = (
        f"{summary['rows']} rows x {len(summary['columns'])} columns ({summary['values']} values), "
        f"max |diff| {worst:.3g}, tolerance {args.atol:g}"
    )
    if not problems:
        print(f"compare_predictions: OK: {head}")
        return EXIT_OK
    if not summary["columns"]:
        print(f"compare_predictions: the runs ended differently ({len(problems)} difference(s)); values not compared",
              file=sys.stderr)
        print(f"  reference: {args.reference}\n  candidate: {args.candidate}", file=sys.stderr)
        for line in problems[: args.max_report]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > args.max_report:
            print(f"  ... and {len(problems) - args.max_report} more", file=sys.stderr)
        return EXIT_DIFFERENT
    print(f"compare_predictions: {len(problems)} difference(s): {head}", file=sys.stderr)
    print(f"  reference: {args.reference}\n  candidate: {args.candidate}", file=sys.stderr)
    for line in problems[: args.max_report]:
        print(f"  {line}", file=sys.stderr)
    if len(problems) > args.max_report:
        print(f"  ... and {len(problems) - args.max_report} more", file=sys.stderr)
    per_col = ", ".join(f"{c}={d:.3g}" for c, d in summary["max_abs_diff"].items() if d > args.atol)
    if per_col:
        print(f"  columns over tolerance (max |diff|): {per_col}", file=sys.stderr)
    return EXIT_DIFFERENT


if __name__ == "__main__":
    sys.exit(main())
