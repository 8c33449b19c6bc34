"""One optimizer step, and the optimiser and learning-rate schedule it steps.

:func:`train_step` is the single step of every stage; ``scripts/bench_train.py`` times this same
function, so a benchmark measures what training runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from agcnn.config import StageConfig
from agcnn.metrics import masked_bce_with_logits, with_no_finding


def amp_context(amp: bool, device: torch.device):
    """bf16 autocast on CUDA when ``amp``; full precision otherwise (and always on the CPU).

    Validation does not use it: every score runs at train.inference_precision (agcnn.precision)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def with_targets(pair: tuple[Tensor, Tensor], model: nn.Module) -> tuple[Tensor, Tensor]:
    """(logits, labels) of a source, with the "No Finding" target appended when the model has
    that 15th output (model.no_finding; agcnn.metrics.with_no_finding)."""
    logits, y = pair
    return logits, (with_no_finding(y) if getattr(model, "no_finding", False) else y)


def train_step(compute: Callable[[], tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer, *,
               device: torch.device, amp: bool) -> Tensor:
    """One optimizer step of any stage: ``compute()`` gives (logits, labels) -- under bf16
    autocast on CUDA when ``amp`` -- then the masked BCE (missing labels left out), backward and
    the step. Returns the loss, detached and on the device (reading it would synchronise a GPU).
    The benchmarks time this same function."""
    with amp_context(amp, device):
        logits, y = compute()
    loss = masked_bce_with_logits(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def cosine_factor(epoch: int, epochs: int) -> float:
    """Share of the base learning rate in ``epoch`` (0-based) of a cosine schedule over ``epochs``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """After loading a cosine schedule's state: the learning rate its configured epochs give now
    (the optimiser's saved lr came from the schedule of the interrupted run)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)


def build_optimizer(params: list[nn.Parameter], sc: StageConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The stage's optimiser and its per-epoch learning-rate schedule."""
    if sc.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=sc.lr, betas=(sc.momentum, 0.999), weight_decay=sc.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=sc.lr, momentum=sc.momentum, weight_decay=sc.weight_decay)
    if sc.schedule == "cosine":
        # Closed form in the epoch (a function of the configured epochs, not of the last lr): a
        # stage resumed with more epochs continues on the longer schedule (see set_scheduled_lr).
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_factor, epochs=sc.epochs))
    # Paper Sec. 4.2: lr 0.01, divided by 10 every 20 epochs.
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=sc.lr_step, gamma=sc.lr_gamma)
