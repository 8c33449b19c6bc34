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
