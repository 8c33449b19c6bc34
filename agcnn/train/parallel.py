"""Training in several processes under ``torchrun``: DistributedDataParallel (gloo on the CPU,
nccl on CUDA), synchronised batch norm, and the evaluation shares gathered back.

``batch_size`` is the total over all processes; every process validates every world-th image
and the probabilities are reassembled in dataset order on all of them; only rank 0 writes
files. In a single process every function here is a no-op or returns its input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from agcnn.errors import ConfigError
from agcnn.runtime import Runtime, all_gather
from agcnn.stages import Stage


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun; itself in a single process."""
    if not rt.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


class FuseHead(nn.Module):
    """The fusion head alone as a module, so DDP wraps (and broadcasts, and reduces) the fusion
    layer only, not the frozen branches around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Registered: the layers AGCNN.fuse uses. The model itself is kept out of the module tree.
        self.fusion, self.fusion_dropout = model.fusion, model.fusion_dropout
        object.__setattr__(self, "_model", model)

    def forward(self, g: Tensor, l: Tensor) -> Tensor:
        return self._model.fuse(g, l)


def convert_sync_batchnorm(model: nn.Module, plan: Stage, rt: Runtime) -> None:
    """Batch norm of the modules the stage trains -> SyncBatchNorm (``train.sync_batchnorm``).

    The paper's batch of 64 over 8 GPUs leaves 8 images per batch-norm; synchronised, the
    statistics are those of the whole batch. Frozen modules stay in eval mode and need none.
    The parameter and buffer names do not change, so checkpoints load into plain batch norm.
    """
    if rt.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm does not run on the "
                          "CPU); set it to false for a CPU run")
    for name in plan.trains:
        if name != "fusion":
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))


def gather_rows(rt: Runtime, idx: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reassemble per-process rows (in dataset order) on every process; ``idx``: the dataset rows
    of this process's arrays (a row skipped as unreadable is in no process's).

    The shares travel as tensors (``all_gather``, padded to the longest), not as pickled objects.
    """
    if not rt.distributed:
        return arrays
    import torch.distributed as dist

    # nccl gathers CUDA tensors only; gloo gathers CPU tensors.
    dev = rt.device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([len(idx)], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(mine) for _ in range(rt.world)]
    dist.all_gather(counts, mine)
    counts = [int(c) for c in counts]
    longest = max(counts)

    def gather(a: np.ndarray) -> list[np.ndarray]:
        local = torch.zeros((max(longest, 1), *a.shape[1:]), dtype=torch.from_numpy(a[:0]).dtype, device=dev)
        local[: len(a)] = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        parts = [torch.empty_like(local) for _ in range(rt.world)]
        dist.all_gather(parts, local)
        return [part[:c].cpu().numpy() for part, c in zip(parts, counts)]

    idxs = gather(np.asarray(idx, dtype=np.int64))
    present = np.sort(np.concatenate(idxs))
    where = [np.searchsorted(present, i) for i in idxs]
    out = {}
    for key, a in arrays.items():
        full = np.empty((len(present), *a.shape[1:]), dtype=a.dtype)
        for w, part in zip(where, gather(a)):
            full[w] = part
        out[key] = full
    return out


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Batch-norm running statistics from rank 0 on every process.

    DDP broadcasts them at the start of each forward, so after the last step each process holds
    statistics updated with its own batch; validation and the checkpoint use rank 0's.
    """
    if not rt.distributed:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def check_replicas_agree(model: nn.Module, rt: Runtime, stage_name: str) -> None:
    """Under DDP every process must end a stage with the weights rank 0 saved."""
    if not rt.distributed:
        return
    with torch.no_grad():
        digest = [float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()]
    parts = all_gather(rt, digest)
    if any(p != parts[0] for p in parts[1:]):
        raise RuntimeError(f"the {stage_name} stage ended with different weights on different processes; "
                           f"the saved checkpoint holds rank 0's. Check that every process sees the same data")
