"""Shared fixtures: the smallest configs, models and checkpoints the tests build on.

* ``tiny_config(*overrides)`` -- a trainable config: ResNet-18, 32 px, one epoch and batches of
  4 per stage, CPU, no loader workers; overrides as ``--set`` items.
* ``small_config(**data)`` -- an inference-sized config: ResNet-18 at 64 px.
* ``untrained_checkpoint(path, data=..., seed=..., **extra)`` -- a checkpoint of a seeded,
  untrained ``small_config`` model (``extra``: ``stage=``, ``operating_points=``, ...).
* ``tiny_model`` -- a seeded, untrained AG-CNN of ``tiny_config()``.
* ``one_thread`` -- one intra-op thread for the test: tiny models gain nothing from more, and
  on a busy machine OpenMP threads spin-wait for each other.

Tests marked ``gpu`` run only where CUDA is available.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from agcnn.config import Config

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=32", "data.highres_size=48",
    "data.num_workers=0", "train.device=cpu", "train.channels_last=false",
    "train.global.batch_size=4", "train.local.batch_size=4", "train.fusion.batch_size=4",
    "train.global.epochs=1", "train.local.epochs=1", "train.fusion.epochs=1",
]


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    def make(*overrides: str) -> Config:
        return Config.load(None, [*TINY, *overrides])

    return make


@pytest.fixture(scope="session")
def small_config() -> Callable[..., Config]:
    def make(**data: Any) -> Config:
        return Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64},
                                 "data": {"image_size": 64, "highres_size": 64, **data}})

    return make


@pytest.fixture(scope="session")
def untrained_checkpoint(small_config) -> Callable[..., Path]:
    from agcnn.checkpoint import save_checkpoint
    from agcnn.models import AGCNN

    def write(path: Path, *, data: dict[str, Any] | None = None, seed: int = 0, **extra: Any) -> Path:
        cfg = small_config(**(data or {}))
        torch.manual_seed(seed)
        model = AGCNN.from_config(cfg.model, num_classes=len(cfg.labels), image_size=cfg.data.image_size)
        save_checkpoint(path, model_state=model.state_dict(), config=cfg, **extra)
        return path

    return write


@pytest.fixture
def tiny_model(tiny_config):
    """A seeded, untrained AG-CNN of ``tiny_config()``."""
    from agcnn.models import AGCNN

    torch.manual_seed(0)
    cfg = tiny_config()
    return AGCNN.from_config(cfg.model, num_classes=len(cfg.labels), image_size=cfg.data.image_size)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is available here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
