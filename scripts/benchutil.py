"""What the benchmark scripts share: one timer, one baseline, and naming the device they ran on."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; on the CPU its model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Python, torch, torchvision and, on a CUDA build, the CUDA and cuDNN versions."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (the host's clock means nothing before that)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children: immune to other jobs on the machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn: Callable[[], object], device: torch.device, *, iters: int, warmup: int = 1, clock: str = "wall") -> dict:
    """The one timer of the benchmarks: ``fn`` called ``warmup`` times, then ``iters`` times.

    Returns ``seconds`` (median per call), ``iters``, and on CUDA ``peak_memory_gib`` (the most
    memory the timed calls held, counting what was allocated before them). The device is
    synchronised before the clock starts and after each call. ``clock="cpu"`` counts this
    process's CPU seconds instead of elapsed time (per-core rates that hold on a busy machine).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else cpu_seconds
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, iters)):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    out = {"seconds": float(np.median(times)), "iters": len(times)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def rate(items: int, timing: dict) -> float:
    """Items per second of one call timed by :func:`measure`."""
    return round(items / timing["seconds"], 2)


def cpu_loop_region_step(features: torch.Tensor, images: torch.Tensor, image_size: int, out_size: int,
                         threshold: float = 0.7) -> torch.Tensor:
    """The baseline: the region step per image on the CPU, the way earlier AG-CNN code does it.

    Host copies of the features and images, heatmap in numpy, ``cv2.resize`` to the input size,
    threshold, ``skimage.measure.label``, the largest region's box, crop (from ``images``, which
    may be a higher-resolution copy: the box is scaled), ``cv2.resize`` to ``out_size``, and
    back to a tensor on the images' device. For comparison only.
    """
    import cv2
    from skimage.measure import label

    heat = features.detach().float().abs().amax(dim=1).cpu().numpy()
    imgs = images.detach().float().cpu().numpy()
    f = images.shape[-1] / image_size
    crops = []
    for hm, img in zip(heat, imgs):
        lo, hi = hm.min(), hm.max()
        hm = (hm - lo) / (hi - lo) if hi > lo else np.zeros_like(hm)
        mask = cv2.resize(hm, (image_size, image_size), interpolation=cv2.INTER_LINEAR) > threshold
        x0, y0, x1, y1 = 0, 0, image_size, image_size
        if mask.any():
            lab = label(mask, connectivity=2)
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            ys, xs = np.nonzero(lab == sizes.argmax())
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        hwc = img.transpose(1, 2, 0)  # CHW -> HWC by permuting, not reshaping
        patch = hwc[int(y0 * f):max(int(y1 * f), int(y0 * f) + 1), int(x0 * f):max(int(x1 * f), int(x0 * f) + 1)]
        patch = cv2.resize(np.ascontiguousarray(patch), (out_size, out_size), interpolation=cv2.INTER_LINEAR)
        crops.append(torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))))
    return torch.stack(crops).to(images.device, images.dtype)
