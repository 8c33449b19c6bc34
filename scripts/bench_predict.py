"""Batch-inference throughput and memory of ``agcnn predict``.

    python scripts/bench_predict.py [--files 48] [--workers 2] [--batch-size 8] [--rss-counts 1000 10000]

1. Writes ``--files`` 1024 x 1024 DICOMs twice, uncompressed and JPEG 2000 lossless (RLE when
   no JPEG 2000 encoder is installed; the output says which), from the NIH sample's 1024 px
   originals (``--sample``) with 12-bit noise added so that no two files are alike; a generated
   phantom when the sample is absent.
2. For each: end-to-end files/s of ``agcnn predict`` (the paper's model: ResNet-50, 224 px,
   random weights -- speed does not depend on them), next to decode-only files/s: the same
   DataLoader, dataset and transform with the same workers and batch size, no model.
3. Peak RSS of ``agcnn predict`` over 1,000 and 10,000 files with a small ResNet-18 (32 px input),
   to show that memory does not grow with the number of files. The files are real copies
   (128 x 128 DICOMs): predict lists a file reached twice through links or hard links once,
   so links cannot stand in for distinct files. The two input folders are made of links to
   sub-folders (10 and 100 of 100 files each).

Every timed run is a separate ``agcnn predict`` process; its rate is the manifest's
``files_per_second`` (the decode + predict loop, without start-up). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agcnn.checkpoint import save_checkpoint
from agcnn.config import Config
from agcnn.data.dicom_write import encodable_transfer_syntaxes, write_dicom
from agcnn.labels import LABELS
from agcnn.models import AGCNN
from benchutil import cpu_model, device_name, versions

REPO = Path(__file__).resolve().parents[1]

# Runs `agcnn predict` and prints its own peak RSS and that of its largest worker (kB).
_RSS_RUNNER = """
import json, resource, sys
from agcnn.cli import main
rc = main(sys.argv[1:])
print("RSS " + json.dumps({"rc": rc, "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), flush=True)
"""


def sources(sample: Path) -> list[np.ndarray]:
    """1024 x 1024 uint8 chest images: the NIH originals, else one generated phantom."""
    files = sorted((sample / "originals_1024").glob("*.png")) if sample.is_dir() else []
    if files:
        from PIL import Image

        return [np.asarray(Image.open(f).convert("L").resize((1024, 1024))) for f in files]
    yy, xx = np.mgrid[0:1024, 0:1024] / 1024.0
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    return [(255 * (1 - 0.7 * lungs)).clip(0, 255).astype(np.uint8)]


def write_set(folder: Path, n: int, srcs: list[np.ndarray], ts, seed: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for i in range(n):
        # 8-bit source -> 12 bits with noisy low bits: sizes and codec work like a CR film's.
        px = srcs[i % len(srcs)].astype(np.uint16) * 16 + rng.integers(0, 16, (1024, 1024), dtype=np.uint16)
        write_dicom(folder / f"IM{i:05d}", px, transfer_syntax=ts, modality="CR")
    return time.perf_counter() - t


def checkpoint(path: Path, *, backbone: str, image_size: int, resize: int) -> None:
    cfg = Config.from_dict({
        "model": {"backbone": backbone, "local_size": image_size},
        "data": {"image_size": image_size, "highres_size": image_size, "resize": resize},
    })
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=image_size)
    save_checkpoint(path, model_state=model.state_dict(), config=cfg)


def predict(ckpt: Path, inp: Path, out: Path, workers: int, batch: int, runner: Path, device: str = "cpu") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(runner), "predict", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
           "--workers", str(workers), "--batch-size", str(batch), "--device", device]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t
    rss = next((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RSS ")), None)
    if proc.returncode != 0 or rss is None:
        raise SystemExit(f"predict failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "files": manifest["rows_this_run"],
        "files_per_s": manifest["files_per_second"],
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss["self_kb"] / 1024, 1),
        "peak_worker_rss_mib": round(rss["workers_kb"] / 1024, 1),
        "counts": manifest["counts"],
    }


def decode_only(ckpt: Path, inp: Path, workers: int, batch: int) -> float:
    """files/s of the predict input pipeline alone: same dataset, transform, loader settings."""
    from torch.utils.data import DataLoader

    from agcnn.checkpoint import load_checkpoint
    from agcnn.data.transforms import transforms_from_config
    from agcnn.predict.listing import list_files
    from agcnn.predict.records import FileRecords, collate, worker_init

    cfg = Config.from_dict(load_checkpoint(ckpt)["config"])
    listing = list_files(inp)
    ds = FileRecords(str(inp), listing.paths, listing.decided, transforms_from_config(cfg.data, train=False),
                      identifiers=False, previews=False)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                        worker_init_fn=worker_init if workers else None, prefetch_factor=2 if workers else None)
    t = time.perf_counter()
    n = 0
    for records, images in loader:
        n += len(records)
        assert images is not None and len(images) == len(records)
    return round(n / (time.perf_counter() - t), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "nih-cxr14-sample")
    parser.add_argument("--files", type=int, default=48, help="1024 px files per transfer syntax")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rss-counts", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--rss-distinct", type=int, default=200, help="distinct 128 px files the RSS folders are copied from")
    parser.add_argument("--device", default="cpu", help="where predict runs the model (cpu, cuda)")
    parser.add_argument("--backbone", default="resnet50", help="end-to-end model's backbone (the paper's: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="end-to-end model's input side (resize = 8/7 of it)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()

    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    work = Path(tempfile.mkdtemp(prefix="bench_predict_")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    runner = work / "runner.py"
    runner.write_text(_RSS_RUNNER)
    result: dict = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device_name(torch.device(args.device)),
        "versions": versions(),
        "workers": args.workers,
        "batch_size": args.batch_size,
    }
    try:
        import pydicom

        result["pydicom"] = pydicom.__version__
        j2k = JPEG2000Lossless if JPEG2000Lossless in encodable_transfer_syntaxes() else RLELossless
        srcs = sources(args.sample)
        result["pixels_from"] = "NIH originals_1024" if len(srcs) > 1 else "generated phantom"
        big = work / "model.pt"
        resize = round(args.image_size * 8 / 7)
        checkpoint(big, backbone=args.backbone, image_size=args.image_size, resize=resize)
        result["end_to_end_model"] = f"{args.backbone}, image {args.image_size}, resize {resize}, random weights"
        result["1024px"] = {}
        for name, ts in (("uncompressed", ExplicitVRLittleEndian), ("jpeg2000" if j2k == JPEG2000Lossless else "rle", j2k)):
            folder = work / name
            write_s = write_set(folder, args.files, srcs, ts, seed=1)
            size = sum(f.stat().st_size for f in folder.iterdir()) / args.files / 1024**2
            dec = decode_only(big, folder, args.workers, args.batch_size)
            e2e = predict(big, folder, work / f"out-{name}", args.workers, args.batch_size, runner, args.device)
            result["1024px"][name] = {
                "transfer_syntax": str(ts.name), "mib_per_file": round(size, 2), "write_s": round(write_s, 1),
                "decode_only_files_per_s": dec, "end_to_end": e2e,
                "end_to_end_over_decode": round(e2e["files_per_s"] / dec, 3),
            }
            print(json.dumps({name: result["1024px"][name]}), file=sys.stderr, flush=True)

        if args.rss_counts:
            small = work / "resnet18.pt"
            checkpoint(small, backbone="resnet18", image_size=32, resize=36)
            pool = work / "rss-pool"
            rng = np.random.default_rng(2)
            distinct = []
            for i in range(args.rss_distinct):
                p = work / "rss-distinct" / f"IM{i:04d}"
                p.parent.mkdir(parents=True, exist_ok=True)
                write_dicom(p, rng.integers(0, 4096, (128, 128), dtype=np.uint16), modality="DX")
                distinct.append(p)
            top = max(args.rss_counts)
            for d in range((top + 99) // 100):
                sub = pool / f"d{d:03d}"
                sub.mkdir(parents=True, exist_ok=True)
                for j in range(100):
                    shutil.copyfile(distinct[(d * 100 + j) % len(distinct)], sub / f"IM{j:03d}")
            result["rss"] = {"model": "resnet18, image 32", "file": "128 x 128 DICOM, real copies"}
            for count in args.rss_counts:
                inp = work / f"rss-{count}"
                inp.mkdir(exist_ok=True)
                for d in range(count // 100):
                    link = inp / f"d{d:03d}"
                    if not link.exists():
                        os.symlink(pool / f"d{d:03d}", link)
                r = predict(small, inp, work / f"out-rss-{count}", args.workers, 64, runner, args.device)
                result["rss"][str(count)] = r
                print(json.dumps({f"rss {count}": r}), file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
