"""Input-pipeline throughput: decoding originals vs. reading the cache, and DataLoader batches.

    python scripts/bench_data.py [--sample ../shared/data/nih-cxr14-sample] [--workers 0 1 2]

Uses the 621-image NIH sample (512 px PNGs) and its two untouched 1024 px originals (decoded
repeatedly). Prints one JSON object. Rates are images per second: "per_core" rates are images per CPU-second
of one process (one torch / OpenCV thread), so they hold on a busy machine; "wall" rates are
elapsed time and depend on what else runs.

Two loader paths: "train224" applies the training transform per image in the workers (float32
resize, crop, flip, normalise); "stored" only reads the cache and collates uint8 squares, the
transform then runs per batch on the training device (``data.augment_on``). ``workers_per_gpu``
divides a GPU's training step rate -- from ``--step-json`` (a ``bench_train.py`` result), else
the reference H100 figure, labelled as such -- by each path's per-core rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agcnn.data.cache import ImageCache, build_cache
from agcnn.data.datasets import XrayDataset
from agcnn.data.device_transforms import DeviceTransform
from agcnn.data.readers import read_image
from agcnn.data.transforms import build_transform
from agcnn.labels import LABELS
from benchutil import cpu_model, cpu_seconds, measure

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# Reference H100 training step (issue figures, torch 2.11): bare ResNet-50, bf16 + channels_last,
# batch 128. Used only when no measured --step-json is given, and labelled so.
REFERENCE_STEP = 3721.0


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def timed(fn, n: int) -> float:
    """Images per CPU-second of one process (torch and OpenCV limited to one thread)."""
    return rate(n, measure(fn, CPU, iters=1, warmup=0, clock="cpu")["seconds"])


def loader_rates(ds, args: argparse.Namespace, out: dict, key: str) -> None:
    """Images/s of a shuffled DataLoader over ``ds`` for each of ``args.workers``: the wall clock
    (what the training loop sees; it depends on the machine's other load) as
    ``{key}_{w}workers_wall``, and with no workers the rate per CPU-second as ``{key}_per_core``."""
    for w in args.workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w,
                                             persistent_workers=w > 0, drop_last=True)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        start, cpu0 = time.perf_counter(), cpu_seconds()
        n = 0
        for _ in range(args.batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            n += batch["image"].shape[0]
        out[f"{key}_{w}workers_wall"] = rate(n, time.perf_counter() - start)
        del it, loader
        if w == 0:
            out[f"{key}_per_core"] = rate(n, cpu_seconds() - cpu0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "nih-cxr14-sample")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per DataLoader setting")
    parser.add_argument("--repeat-1024", type=int, default=15, help="decodes of each 1024 px original")
    parser.add_argument("--step-json", type=Path, default=None,
                        help="bench_train.py JSON from the training GPU: its bare / stage step rates set the workers needed")
    args = parser.parse_args()
    if not (args.sample / "labels.csv").is_file():
        raise SystemExit(f"NIH sample not found at {args.sample}; pass --sample DIR (with labels.csv, images/, originals_1024/)")
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)

    images = args.sample / "images"
    table = pd.read_csv(args.sample / "labels.csv")
    table = table.rename(columns={"image": "path"})[["path", *LABELS]]
    paths = [images / p for p in table["path"]]
    originals = sorted((args.sample / "originals_1024").glob("*.png"))
    out: dict = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "images_512": len(paths), "batch_size": args.batch_size,
        # Other processes on the machine slow every number down; keep the load with the result.
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
    }

    read_image(originals[0])  # warm up imports and caches
    out["decode_png_1024_per_core"] = timed(lambda: [read_image(p) for _ in range(args.repeat_1024) for p in originals], args.repeat_1024 * len(originals))
    out["decode_png_512_per_core"] = timed(lambda: [read_image(p) for p in paths], len(paths))

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        start, cpu0 = time.perf_counter(), cpu_seconds()
        report = build_cache(cache_dir, table["path"].tolist(), images, size=512, workers=min(2, os.cpu_count() or 1))
        out["cache_build_512_2proc_wall"] = rate(report.decoded, time.perf_counter() - start)
        out["cache_build_512_per_core"] = rate(report.decoded, cpu_seconds() - cpu0)
        cache = ImageCache(cache_dir)
        rows = cache.verify(table["path"].tolist(), images, size=512)
        order = np.random.default_rng(0).permutation(len(rows))
        cache.read(0)
        out["cache_read_512_per_core"] = timed(lambda: [cache.read(int(rows[i])) for i in order], len(order))

        train_t = build_transform(train=True, resize=256, image_size=224)
        eval_t = build_transform(train=False, resize=256, image_size=224)
        x = torch.from_numpy(cache.read(0))[None]
        out["train_transform_224_per_core"] = timed(lambda: [train_t(x) for _ in range(200)], 200)
        out["eval_transform_224_per_core"] = timed(lambda: [eval_t(x) for _ in range(200)], 200)
        hr = build_transform(train=True, resize=256, image_size=224, highres_size=448)
        out["train_transform_448_per_core"] = timed(lambda: [hr(x) for _ in range(100)], 100)

        dev_t = DeviceTransform(train=True, resize=256, image_size=224)
        stored = torch.from_numpy(cache.read_stored(0))[None, None].expand(args.batch_size, 1, 512, 512).contiguous()
        out["device_transform_224_on_cpu_per_core"] = timed(lambda: [dev_t(stored) for _ in range(3)], 3 * args.batch_size)

        stored_ds = XrayDataset(table, LABELS, root=images, name="train", cache=cache, cache_rows=rows, stored_size=512)
        loader_rates(stored_ds, args, out, "loader_stored_cache")

        for source in ("cache", "png"):
            ds = XrayDataset(table, LABELS, root=images, transform=train_t, name="train",
                             cache=cache if source == "cache" else None, cache_rows=rows if source == "cache" else None)
            loader_rates(ds, args, out, f"loader_train224_{source}")
    out["workers_per_gpu"] = workers_per_gpu(out, args.step_json)
    print(json.dumps(out, indent=1))


def workers_per_gpu(out: dict, step_json: Path | None) -> dict:
    """Loader workers one GPU needs on each input path: its step rate / the path's per-core rate."""
    if step_json is not None:
        train = json.loads(step_json.read_text())
        stages = train["stages"]
        step = max(v["images_per_s"] for k, v in stages.items() if k in ("bare", "global", "local", "fusion"))
        source = f"measured: fastest image stage of {step_json.name} on {train.get('device')}"
    else:
        step, source = REFERENCE_STEP, "reference H100 figure (bare ResNet-50 train step, bf16, batch 128), not measured here"
    paths = {
        "stored_cache_transform_on_gpu": out.get("loader_stored_cache_per_core"),
        "cache_transform_in_workers": out.get("loader_train224_cache_per_core"),
        "png_512_transform_in_workers": out.get("loader_train224_png_per_core"),
        "png_1024_decode_only": out.get("decode_png_1024_per_core"),
    }
    return {"gpu_step_images_per_s": step, "step_source": source,
            **{k: math.ceil(step / v) for k, v in paths.items() if v}}


if __name__ == "__main__":
    main()
