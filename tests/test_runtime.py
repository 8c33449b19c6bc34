"""One device rule for every command, and the single-process side of the torchrun helpers."""

from __future__ import annotations

import pytest
import torch

from agcnn.errors import UsageError
from agcnn.runtime import Runtime, all_gather, mean_over_ranks, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps", ""])
def test_an_unknown_device_names_the_valid_ones(name):
    with pytest.raises(UsageError, match=r"train\.device=.* is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(name, option="train.device")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_device_says_what_to_use(name):
    with pytest.raises(UsageError, match=r"--device='cuda.*no CUDA device is visible.*use --device=cpu"):
        resolve_device(name)


@pytest.mark.gpu
def test_bare_cuda_is_this_process_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # wraps round to the first device
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


def test_single_process_helpers():
    rt = Runtime(torch.device("cpu"))
    assert rt.is_main and not rt.distributed
    assert all_gather(rt, {"a": 1}) == [{"a": 1}]
    assert mean_over_ranks(rt, 6.0, 3) == 2.0
    assert mean_over_ranks(rt, 0.0, 0) != mean_over_ranks(rt, 0.0, 0)  # NaN when nothing was counted


def test_loader_workers_are_capped_at_the_cores_this_process_may_use_said_once(monkeypatch, caplog, tiny_config):
    import logging
    import os

    from agcnn import runtime
    from agcnn.train import make_loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "_CAPPED", set())
    with caplog.at_level(logging.WARNING, logger="agcnn.runtime"):
        assert runtime.loader_workers(8) == 2
        assert runtime.loader_workers(8) == 2  # every epoch builds a loader: no second line
        assert runtime.loader_workers(2) == 2 and runtime.loader_workers(0) == 0
        loader = make_loader(list(range(4)), 2, train=False, epoch=0, cfg=tiny_config("data.num_workers=8"),
                             rt=Runtime(torch.device("cpu")))
    assert loader.num_workers == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["data.num_workers=8 capped at 2: the CPU cores this process may use"]
    # Under torchrun the processes of one machine share its cores.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.loader_workers(8) == 1
