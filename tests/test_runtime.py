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


@no_cuda
@pytest.mark.parametrize("command", [["predict", "--input", ".", "--output", "out"], ["evaluate", "--out", "out"],
                                     ["localize", "--boxes", "b.csv", "--images", ".", "--out", "out"]])
def test_every_command_takes_cuda_n(command, tmp_path, capsys, monkeypatch):
    # One device-name pattern: `--device cuda:1` reaches the device rule in every command (no
    # argparse menu that lacks cuda:N), which says what to use on a machine without CUDA.
    from agcnn.cli import main

    from agcnn.checkpoint import save_checkpoint
    from agcnn.config import Config
    from agcnn.models import AGCNN

    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 32},
                            "data": {"image_size": 32, "resize": 32, "highres_size": 32}})
    save_checkpoint(tmp_path / "m.pt", model_state=AGCNN.from_config(cfg.model, 14, 32).state_dict(), config=cfg)
    monkeypatch.chdir(tmp_path)
    assert main([command[0], "--checkpoint", "m.pt", "--device", "cuda:1", *command[1:]]) == 2
    assert "--device='cuda:1' asks for CUDA, but no CUDA device is visible" in capsys.readouterr().err


def test_the_device_names_are_one_pattern():
    from agcnn.config import valid_device

    assert all(valid_device(n) for n in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"))
    assert not any(valid_device(n) for n in ("gpu", "cuda:", "cuda:x", "cuda1", " cpu", "CPU", ""))


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
    from agcnn.train.loaders import make_loader

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
