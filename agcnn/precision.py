"""One inference precision for every score a checkpoint produces.

Training validation (which picks ``best.pt`` and its operating points), ``agcnn evaluate`` and
``agcnn predict`` all run the model inside :func:`inference_precision` with the checkpoint's
``train.inference_precision``, on the CPU and on CUDA alike. An operating point chosen on
validation scores is then applied to scores computed the same way: rounding only the last
feature map to bf16 moves a large share of the attention boxes, so thresholds chosen at one
precision do not carry over to scores of another.

* ``fp32``: plain float32. On CUDA, TF32 matrix products and convolutions are switched off for
  the duration (they round inputs to 10 mantissa bits), so a GPU and a CPU deployment of one
  checkpoint differ only by floating-point summation order.
* ``bf16``: ``torch.autocast`` to bfloat16, on whichever device runs the model (CPU included).

Training steps themselves follow ``train.amp`` (bf16 autocast on CUDA); this is about scoring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from agcnn.config import PRECISIONS, check_choice


@contextlib.contextmanager
def inference_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed forward passes at ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    check_choice("train.inference_precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        # Autocast a caller may have entered is switched off: fp32 means fp32.
        with torch.autocast(device.type, enabled=False):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
