"""Size and load time of the ``agcnn report`` page of a large batch-inference run.

    python scripts/bench_report.py [--files 10000] [--overlays 60] [--repeats 3]

1. Writes a predict folder as ``agcnn predict --overlays`` leaves it, without running the model:
   ``predictions.csv`` with ``--files`` rows in predict's own columns (95 % ok with random
   probabilities and calls at 0.5, 3 % skipped as out of scope, 2 % failed), ``manifest.json``
   and ``--overlays`` overlay pictures (drawn once by :mod:`agcnn.overlays` on a phantom, copied),
   and a small untrained checkpoint for the page's model card.
2. Times ``agcnn report`` on it (the page's build) and measures the page's size in bytes.
3. Opens the page in headless Chromium (``scripts/chromium_page.py``: DOM after the paging script
   ran) ``--repeats`` times and, for the browser's own start-up, an empty page as often; prints
   the medians and their difference (the page's load), and the requests the page made (none).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def _chromium_page():
    spec = importlib.util.spec_from_file_location("chromium_page", HERE / "chromium_page.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_folder(out: Path, n: int, n_overlays: int, seed: int = 0) -> Path:
    import torch

    from agcnn.checkpoint import save_checkpoint
    from agcnn.config import Config
    from agcnn.data.synthetic import ensure_phantoms
    from agcnn.labels import LABELS
    from agcnn.models import AGCNN
    from agcnn.overlays import FindingMap, write_overlay
    from agcnn.predict.rows import columns_for

    rng = np.random.default_rng(seed)
    labels = list(LABELS)
    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64}, "data": {"image_size": 64, "highres_size": 64}})
    model = AGCNN.from_config(cfg.model, num_classes=len(labels), image_size=64)
    ckpt = out / "model.pt"
    save_checkpoint(ckpt, model_state=model.state_dict(), config=cfg, stage="fusion",
                    operating_points={"fusion": [0.5] * len(labels)})
    folder = out / "predictions"
    (folder / "overlays" / "study").mkdir(parents=True)
    cols = columns_for(labels, identifiers=False, all_branches=False, calls=True)
    status = rng.choice(["ok", "skipped", "failed"], size=n, p=[0.95, 0.03, 0.02])
    probs = rng.beta(0.5, 4.0, size=(n, len(labels)))
    rows = []
    for i in range(n):
        row = {c: "" for c in cols}
        row.update(path=f"study/{i // 100:04d}/image_{i:05d}.dcm", status=status[i])
        if status[i] == "ok":
            row.update(format="dicom", height=2048, width=2048, box_x0=400, box_y0=300, box_x1=900, box_y1=800)
            row.update({n_: f"{p:.6g}" for n_, p in zip(labels, probs[i])})
            row.update({f"call_{n_}": int(p >= 0.5) for n_, p in zip(labels, probs[i])})
        elif status[i] == "skipped":
            row["reason"] = "out_of_scope: BodyPartExamined is SKULL, not a chest (--any-body-part predicts it anyway)"
        else:
            row["reason"] = "truncated: the file ends inside its pixel data"
        rows.append(row)
    pd.DataFrame(rows, columns=cols).to_csv(folder / "predictions.csv", index=False)
    ok = [r["path"] for r in rows if r["status"] == "ok"]
    # One real overlay on a phantom, copied: the gallery reads and shrinks each file it shows.
    ensure_phantoms(out / "phantoms", count=2, size=512, seed=0)
    film = next((out / "phantoms").rglob("*.png"))
    from PIL import Image

    preview = np.asarray(Image.open(film).convert("L"))
    cam = np.zeros((64, 64), np.float32)
    cam[20:40, 30:50] = 1.0
    first = folder / "overlays" / (ok[0] + ".png")
    write_overlay(first, preview=preview, height=512, width=512, box=(150, 100, 350, 300), field=(0, 0, 512, 512),
                  heatmap=cam, findings=[FindingMap("Nodule", 0.83, cam), FindingMap("Mass", 0.61, cam * 0.5)])
    for p in ok[1:n_overlays]:
        dest = folder / "overlays" / (p + ".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, dest)
    manifest = {"agcnn_version": "bench", "checkpoint": {"path": str(ckpt), "sha256": None}, "labels": labels,
                "arguments": {"include_identifiers": False, "overlays": True},
                "operating_points": {"fusion": [0.5] * len(labels)}, "listing": {"files": n}, "complete": True,
                "torch": torch.__version__}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--overlays", type=int, default=60, help="overlay pictures in the folder (the gallery embeds at most 60)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from agcnn.pages import write_report

    chromium = _chromium_page()
    with tempfile.TemporaryDirectory(prefix="agcnn-bench-report-") as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp, args.files, args.overlays)
        # The same page without the gallery: what the 10,000-row table alone weighs.
        no_gallery = write_report(folder, gallery=0).stat().st_size
        t0 = time.perf_counter()
        page = write_report(folder)
        build = time.perf_counter() - t0
        empty = tmp / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body>empty</body></html>")
        result = {"files": args.files, "overlays_in_folder": args.overlays, "page_bytes": page.stat().st_size,
                  "page_bytes_without_gallery": no_gallery, "load_average": os.getloadavg()[0],
                  "build_seconds": round(build, 2), "cpu": platform.processor() or platform.machine()}
        if chromium.find_chromium() is None:
            result["chromium"] = "not installed: load time not measured"
        else:
            loads, blanks, requests = [], [], []
            for _ in range(args.repeats):
                opened = chromium.open_page(page)
                loads.append(opened.seconds)
                requests += opened.requests
                assert f"of {args.files} shown; page 1 of" in opened.dom, "the paging script did not run"
                blanks.append(chromium.open_page(empty).seconds)
            import subprocess

            version = subprocess.run([chromium.find_chromium(), "--version"], capture_output=True, text=True).stdout.strip()
            result.update(chromium=version, chromium_seconds_median=round(statistics.median(loads), 2),
                          empty_page_seconds_median=round(statistics.median(blanks), 2),
                          page_load_seconds=round(statistics.median(loads) - statistics.median(blanks), 2),
                          requests=requests)
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
            if line.startswith("model name"):
                result["cpu"] = line.split(":", 1)[1].strip()
                break
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
