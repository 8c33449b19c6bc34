"""The data pre-check over a ChestX-ray14-sized table: headers of 112,120 rows.

    python scripts/bench_precheck.py [--sample ../shared/data/nih-cxr14-sample] [--rows 112120]

The 621 sample PNGs are listed over and over until the table has ``--rows`` rows, so the files
are in the page cache after the first pass (warm: what a second run, or a local SSD, sees; a cold
network share is bounded by its latency instead). Prints one JSON object; "wall" is elapsed
time and depends on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

from agcnn.data.datasets import XrayDataset
from agcnn.data.precheck import THREADS, find_problems
from benchutil import cpu_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "nih-cxr14-sample")
    parser.add_argument("--rows", type=int, default=112_120)
    args = parser.parse_args()
    files = sorted(p.name for p in (args.sample / "images").glob("*.png")) or sorted(p.name for p in args.sample.glob("*.png"))
    root = args.sample / "images" if (args.sample / "images").is_dir() else args.sample
    paths = [files[i % len(files)] for i in range(args.rows)]
    ds = XrayDataset(pd.DataFrame({"path": paths, "Nodule": 0.0}), ["Nodule"], root=root, name="train")
    find_problems(ds)  # warm the page cache
    result = {"rows": len(ds), "files": len(files), "threads": THREADS, "cpu": cpu_model(), "cpus": os.cpu_count()}
    for threads in (1, THREADS):
        t0 = time.perf_counter()
        problems = find_problems(ds, threads=threads)
        result[f"wall_s_{threads}_threads"] = round(time.perf_counter() - t0, 2)
    result["problems"] = len(problems)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
