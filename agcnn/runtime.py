"""Where the code runs: the device, and the processes of a ``torchrun`` job.

One device rule for every command: ``auto`` (CUDA when PyTorch sees a device, else the CPU),
``cpu``, ``cuda`` (this process's device: ``LOCAL_RANK`` under torchrun, else the first) or
``cuda:N``. Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_runtime` joins the process
group (nccl on CUDA, gloo on the CPU); the helpers below are no-ops in a single process.

Imports: ``torch``, :mod:`agcnn.errors` and the device names of :mod:`agcnn.config`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from agcnn.config import valid_device
from agcnn.errors import UsageError


def resolve_device(name: str, *, option: str = "--device", local_rank: int | None = None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a device PyTorch can use.

    ``option`` is how the user gave the name (``--device``, ``train.device``), for the error;
    ``local_rank`` picks the device of a bare ``cuda`` (default: ``LOCAL_RANK``, else 0).
    """
    if not valid_device(name):
        raise UsageError(f"{option}={name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"{option}={name!r} asks for CUDA, but no CUDA device is visible to PyTorch; "
                         f"use {option}=cpu (or auto)")
    if name != "cuda":
        return torch.device(name)
    rank = env_local_rank() if local_rank is None else local_rank
    return torch.device("cuda", rank % max(1, torch.cuda.device_count()))


def env_local_rank() -> int:
    """This process's ``LOCAL_RANK`` under torchrun; 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask), not those of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# (requested, cap) pairs already reported: the cap is said once per process, not per loader.
_CAPPED: set[tuple[int, int]] = set()


def loader_workers(requested: int, option: str = "data.num_workers") -> int:
    """``requested`` DataLoader worker processes, at most the cores this process may use
    (:func:`cpu_count`; under torchrun shared by the processes of this machine). More workers
    than cores only compete for them, and torch warns about it at every loader. A cap is
    logged once, naming the option."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cap = max(1, cpu_count() // local)
    if requested <= cap:
        return requested
    if (requested, cap) not in _CAPPED:
        _CAPPED.add((requested, cap))
        where = f" per process ({local} on this machine)" if local > 1 else ""
        logging.getLogger(__name__).warning("%s=%d capped at %d: the CPU cores this process may use%s", option, requested, cap, where)
    return cap


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str, *, option: str = "train.device") -> Runtime:
    """Single process, or one process of a ``torchrun`` job (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(resolve_device(device, option=option, local_rank=0))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), env_local_rank()
    dev = resolve_device(device, option=option, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank=rank, world=world, local_rank=local_rank, distributed=True)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather(rt: Runtime, obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` in a single process)."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(rt: Runtime, total: float, count: int) -> float:
    """The mean of ``total / count`` pooled over every process (NaN when no process counted any)."""
    parts = all_gather(rt, (total, count))
    n = sum(c for _, c in parts)
    return sum(t for t, _ in parts) / n if n else float("nan")
