"""Forward throughput of AG-CNN against a bare backbone, and of the region step alone.

Prints one JSON object. Everything is measured in the same process on the same device:

* ``bare``:        one backbone + pool + classifier, the reference an AG-CNN forward is judged by
                   (two backbones, so 0.5 x bare is the ceiling);
* ``agcnn``:       the full forward (global, region step, local, fusion);
* ``region_step``: heatmap -> mask -> largest component -> box -> crop, on features of the
                   right shape;
* ``cpu_loop``:    the region step done per image on the CPU with numpy / OpenCV / scikit-image,
                   the way earlier public code did it (including the device -> host copy).

    python scripts/bench_model.py --device cuda --batch-size 256 --dtype bf16 --channels-last
    python scripts/bench_model.py --device cpu --batch-size 16 --backbone resnet18
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torchvision

from agcnn import __version__
from benchutil import device_name
from agcnn.models import AGCNN, Branch
from agcnn.models.roi import attention_boxes, attention_mask, crop_regions, largest_component_boxes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call, median of ``iters`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cpu_loop_region_step(features: torch.Tensor, images: torch.Tensor, image_size: int, out_size: int, threshold: float):
    """Per-image reference as earlier code did it: host copies, cv2 resize, skimage label."""
    import cv2
    from skimage.measure import label

    feats = features.float().cpu().numpy()
    imgs = images.float().cpu().numpy()
    crops = []
    for f, img in zip(feats, imgs):
        hm = np.abs(f).max(axis=0)
        hm = (hm - hm.min()) / max(hm.max() - hm.min(), 1e-12)
        mask = cv2.resize(hm, (image_size, image_size), interpolation=cv2.INTER_LINEAR) > threshold
        lab = label(mask, connectivity=2)
        if lab.max() == 0:
            x0, y0, x1, y1 = 0, 0, image_size, image_size
        else:
            counts = np.bincount(lab.ravel())
            counts[0] = 0
            ys, xs = np.nonzero(lab == counts.argmax())
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        crop = img[:, y0:y1, x0:x1].transpose(1, 2, 0)  # permute, not reshape
        crops.append(cv2.resize(crop, (out_size, out_size), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(crops)).to(features.device)


def naive_propagation(mask: torch.Tensor) -> int:
    """Plain min-label propagation (3x3 min-pool inside the mask until nothing changes).

    The simple batched algorithm, kept here only to measure against; returns its round count.
    """
    b, h, w = mask.shape
    fg = mask[:, None]
    big = float(h * w)
    labels = torch.where(fg, torch.arange(h * w, dtype=torch.float32, device=mask.device).reshape(1, 1, h, w), big)
    rounds = 0
    while True:
        rounds += 1
        new = torch.where(fg, -torch.nn.functional.max_pool2d(-labels, 3, stride=1, padding=1), big)
        if torch.equal(new, labels):
            return rounds
        labels = new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    b, s = args.batch_size, args.image_size
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt)

    bare = Branch(args.backbone, "none", "max", 14).to(device, memory_format=fmt).eval()
    model = AGCNN(14, backbone=args.backbone, image_size=s, local_size=s).to(device, memory_format=fmt).eval()
    with torch.inference_mode(), amp:
        feats = model.global_branch.forward_features(x)

    def run_bare():
        with torch.inference_mode(), amp:
            bare(x)

    def run_agcnn():
        with torch.inference_mode(), amp:
            model(x)

    def run_region():
        with torch.inference_mode():
            crop_regions(x, attention_boxes(feats, s), s, s)

    def run_loop():
        with torch.inference_mode():
            cpu_loop_region_step(feats, x, s, s, 0.7)

    t_bare = timed(run_bare, device, args.iters, args.warmup)
    t_agcnn = timed(run_agcnn, device, args.iters, args.warmup)
    t_region = timed(run_region, device, args.iters, args.warmup)
    t_loop = timed(run_loop, device, max(1, args.iters // 3), 1)

    # The choices for the connected-components step, on the real masks of this batch.
    with torch.inference_mode():
        mask = attention_mask(feats, s)
        ccl = {"torch_hooking": timed(lambda: largest_component_boxes(mask, "torch"), device, args.iters, 1)}
        if device.type == "cpu":
            ccl["scipy_batched"] = timed(lambda: largest_component_boxes(mask, "scipy"), device, args.iters, 1)
        naive_rounds = naive_propagation(mask)
        ccl["naive_propagation"] = timed(lambda: naive_propagation(mask), device, max(1, args.iters // 3), 1)
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"agcnn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
        "backbone": args.backbone,
        "batch_size": b,
        "image_size": s,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "images_per_s": {
            "bare_forward": b / t_bare,
            "agcnn_forward": b / t_agcnn,
            "region_step": b / t_region,
            "cpu_loop_region_step": b / t_loop,
        },
        "components_ms_per_batch": {k: 1000 * v for k, v in ccl.items()},
        "naive_propagation_rounds": naive_rounds,
        "ratios": {
            "agcnn_over_bare": t_bare / t_agcnn,
            "region_step_share_of_agcnn": t_region / t_agcnn,
            "region_step_speedup_over_cpu_loop": t_loop / t_region,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
