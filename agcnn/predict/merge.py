"""``agcnn merge OUT``: join the shares of a sharded ``agcnn predict`` run.

``agcnn predict --shard K/N --output OUT`` (or one torchrun rank) writes ``OUT/shard-K-of-N/``.
Once every share has finished, ``agcnn merge OUT`` writes ``OUT/predictions.csv``,
``OUT/predictions.jsonl`` and ``OUT/manifest.json`` as one unsharded run would, after checking
that:

* every share 0..N-1 is present and finished (the error lists the missing or unfinished ones);
* all shares used the same checkpoint, labels and column options, and saw the same input
  listing (an input that changed between shares would otherwise lose or add files silently);
* every row sits in the share its path hashes to, no file has two rows, and the rows add up to
  the number of files listed.

Overlay pictures stay in each share's ``overlays/`` folder. Exit status as for predict: 0, 1
when some usable files failed, 2 when the shares cannot be merged (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from agcnn.fileio import utc_now
from agcnn.predict.journal import CSV_NAME, JOURNAL, MANIFEST, STATE, iter_rows, write_manifest, write_tables
from agcnn.predict.listing import shard_of
from agcnn.errors import EXIT_FAILED, EXIT_OK, UsageError

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")


class MergeError(UsageError):
    """The shares cannot be merged; the message says why and what to run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the --output folder given to every `agcnn predict --shard K/N`")


def run(args: argparse.Namespace) -> int:
    counts = merge_shards(args.output)
    total = sum(counts.get(s, 0) for s in ("ok", "skipped", "failed"))
    print(
        f"agcnn merge: {total} files: {counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, "
        f"{counts.get('failed', 0)} failed -> {Path(args.output) / CSV_NAME}",
        file=sys.stderr,
    )
    return EXIT_FAILED if counts.get("failed", 0) else EXIT_OK


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge_shards(output: str | Path) -> Counter:
    """Check and merge ``output/shard-K-of-N/``; returns the counts by status and reason."""
    out = Path(output)
    n = _share_count(out)
    dirs = [out / f"shard-{k}-of-{n}" for k in range(n)]
    states, manifests = _finished_shares(out, dirs, n)
    first = states[0]
    try:
        counts = write_tables([d / JOURNAL for d in dirs], out, first["columns"])
    except ValueError as e:  # found before anything is written
        raise MergeError(f"the shares overlap: {e}; remove the duplicated share folders and re-run them") from None
    rows = sum(counts.get(s, 0) for s in ("ok", "skipped", "failed"))
    listed = manifests[0]["listing"]["files"]
    if rows != listed:
        for name in (JOURNAL, CSV_NAME):
            (out / name).unlink(missing_ok=True)
        raise MergeError(f"the shares hold {rows} rows but the input listed {listed} files; re-run every share, then merge")
    write_manifest(out, _merged_manifest(manifests, counts, n, overlays=bool(first.get("options", {}).get("overlays"))))
    return counts


def _share_count(out: Path) -> int:
    """N of the ``shard-K-of-N`` folders in ``out``, all of which are there."""
    if not out.is_dir():
        raise MergeError(f"{str(out)!r} is not a folder; pass the --output folder of the sharded predict run")
    if (out / STATE).exists():
        raise MergeError(f"{str(out)!r} holds an unsharded predict run, not shares; its predictions.csv is already complete")
    found: dict[int, set[int]] = {}
    for child in sorted(out.iterdir()):
        m = SHARD_DIR.match(child.name)
        if m and child.is_dir():
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise MergeError(f"no shard-K-of-N folders in {str(out)!r}; run `agcnn predict --shard K/N --output {out}` first")
    if len(found) > 1:
        raise MergeError(
            f"{str(out)!r} mixes share counts N = {sorted(found)}; a run uses one N. Move the folders of the other "
            f"run elsewhere"
        )
    (n, ks), = found.items()
    missing = [k for k in range(n) if k not in ks]
    extra = sorted(k for k in ks if k >= n)
    if extra:
        raise MergeError(f"share folders {[f'shard-{k}-of-{n}' for k in extra]} have K >= N={n}; remove them")
    if missing:
        raise MergeError(
            f"missing shares {', '.join(f'{k}/{n}' for k in missing)} of {n}; run `agcnn predict --shard K/{n} "
            f"--output {out}` for each (same checkpoint and options), then merge again"
        )
    return n


def _finished_shares(out: Path, dirs: list[Path], n: int) -> tuple[list[dict], list[dict]]:
    """The state and manifest of each share, checked: finished, same checkpoint, options and input."""
    states, manifests = [], []
    unfinished = []
    for k, d in enumerate(dirs):
        state, manifest = _read_json(d / STATE), _read_json(d / MANIFEST)
        if state is None or manifest is None or not manifest.get("complete"):
            unfinished.append(f"{k}/{n}")
        states.append(state)
        manifests.append(manifest)
    if unfinished:
        raise MergeError(
            f"shares {', '.join(unfinished)} have not finished (no complete manifest.json); re-run "
            f"`agcnn predict --shard K/{n} --output {out}` for each: it resumes where it stopped"
        )
    first = states[0]
    for k, state in enumerate(states[1:], 1):
        for key in ("checkpoint_sha256", "labels", "columns", "options"):
            if state.get(key) != first.get(key):
                raise MergeError(
                    f"share {k}/{n} differs from share 0/{n} in {key} ({str(state.get(key))[:60]} vs "
                    f"{str(first.get(key))[:60]}); re-run it with the same checkpoint and options"
                )
    listings = {m["listing"]["sha256"] for m in manifests}
    if len(listings) > 1:
        raise MergeError(
            "the shares saw different input listings (files were added, removed or renamed between them); re-run "
            f"every share on the unchanged input (finished files are not computed again), then merge"
        )
    # Rows in the wrong share would mean the shares were not made by this hashing: refuse.
    for k, d in enumerate(dirs):
        for row in iter_rows(d / JOURNAL):
            if shard_of(row["path"], n) != k:
                raise MergeError(f"{d / JOURNAL} holds {row['path']!r}, which belongs to share {shard_of(row['path'], n)}/{n}")
    return states, manifests


def _merged_manifest(manifests: list[dict], counts: Counter, n: int, *, overlays: bool) -> dict[str, Any]:
    base = manifests[0]
    keys = ("agcnn_version", "checkpoint", "labels", "config", "operating_points", "columns", "versions", "listing",
            "inference_precision", "pixels", "operating_points_pixels")
    merged = {k: base[k] for k in keys if k in base}
    merged.update(
        merged_from=[
            {
                "share": f"{k}/{n}",
                "device": m.get("device"),
                "started": m.get("started"),
                "finished": m.get("finished"),
                "arguments": m.get("arguments"),
                "versions": m.get("versions"),
                "files": (m.get("share") or {}).get("files"),
            }
            for k, m in enumerate(manifests)
        ],
        merged=utc_now(),
        counts={k: v for k, v in sorted(counts.items()) if ":" not in k},
        reasons={k: v for k, v in sorted(counts.items()) if ":" in k},
        overlays=[f"shard-{k}-of-{n}/overlays" for k in range(n)] if overlays else None,
        complete=True,
    )
    return merged
