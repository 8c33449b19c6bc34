"""Shared test setup: tests marked ``gpu`` run only where CUDA is available."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is available here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
