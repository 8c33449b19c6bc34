"""``agcnn demo --quick`` end to end: phantoms, three stages, evaluation, prediction."""

from __future__ import annotations

import pytest
import torch

from agcnn.cli import main
from agcnn.config import Config
from agcnn.demo import demo_config_path


def test_demo_config_ships_with_the_package():
    cfg = Config.load(demo_config_path())
    assert cfg.data.dataset == "synthetic" and cfg.data.highres_size > cfg.data.image_size


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo must not depend on the working directory
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a busy machine
    try:
        assert main(["demo", "--quick", "--out", "d", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    for branch in ("global", "local", "fusion"):
        assert (tmp_path / "d" / "run" / branch / "best.pt").is_file()
        assert any(line.startswith(branch) for line in out.splitlines())
    assert (tmp_path / "d" / "evaluation" / "auc.json").is_file()
    assert (tmp_path / "d" / "predictions" / "predictions.csv").is_file()
    assert "mean AUC" in out and "written:" in out
    # A second run into the same folder finds the finished stages and skips them.
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--out", "d", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    assert "skipped" in capsys.readouterr().out
