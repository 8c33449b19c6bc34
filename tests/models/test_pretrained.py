"""model.pretrained: imagenet (torchvision's weights through torch hub's cache), none, or unset.

No test downloads anything: the network is blocked, and the ImageNet file is a fake with the
right name in a temporary TORCH_HOME.
"""

from __future__ import annotations

import socket

import pytest
import torch
from torchvision.models import resnet18

from agcnn.checkpoint import load_checkpoint
from agcnn.cli import main
from agcnn.config import ConfigError, ModelConfig, describe_start
from agcnn.errors import MissingFileError
from agcnn.models.backbones import check_start_weights, imagenet_file

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision's file name of ResNet18_Weights.IMAGENET1K_V1: what a user is told to download.
RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def offline(monkeypatch):
    """Every attempt to reach the network fails at once, as on an air-gapped server."""
    def refuse(*_a, **_k):
        raise OSError("network blocked in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _fake_imagenet(torch_home):
    """A ResNet-18 state dict (seeded, not ImageNet) under the name torchvision caches it as."""
    torch.manual_seed(3)
    state = resnet18().state_dict()
    path = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state, path


def test_imagenet_file_is_torch_hubs_cache_path(torch_home):
    name, url, path = imagenet_file("resnet18")
    assert name == "ResNet18_Weights.IMAGENET1K_V1" and url.endswith("/" + RESNET18_FILE)
    assert path == torch_home / "hub" / "checkpoints" / RESNET18_FILE
    assert imagenet_file("resnet50")[2].name == "resnet50-0676ba61.pth"
    assert imagenet_file("densenet121")[2].name == "densenet121-a639ec97.pth"


def test_stage_one_starts_from_cached_imagenet_weights(tmp_path, torch_home, offline, tiny_config, capsys):
    state, _ = _fake_imagenet(torch_home)
    root = tmp_path / "phantoms"
    # lr 0: the weights stay those the stage started from, so the checkpoint shows the start.
    cfg = tiny_config("model.pretrained=imagenet", f"data.root={root}", "data.synthetic_count=24",
                      "data.synthetic_size=64", "train.global.lr=0", "train.bootstrap=0")
    cfg_path = tmp_path / "c.yaml"
    cfg.dump(cfg_path)
    assert main(["train", "--config", str(cfg_path), "--stage", "global", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "start: ImageNet weights (torchvision ResNet18_Weights.IMAGENET1K_V1)" in out
    ckpt = load_checkpoint(tmp_path / "run" / "global" / "best.pt")
    assert ckpt["start"] == "ImageNet weights (torchvision ResNet18_Weights.IMAGENET1K_V1)"
    for branch in ("global_branch", "local_branch"):
        for key in ("conv1.weight", "layer3.1.conv2.weight"):
            torch.testing.assert_close(ckpt["model"][f"{branch}.features.{key}"], state[key])
    # Every evaluation report says where the branches started.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "global" / "best.pt"), "--split", "val",
                 "--out", str(tmp_path / "eval"), "--bootstrap", "0"]) == 0
    assert "trained from ImageNet weights" in (tmp_path / "eval" / "auc.md").read_text()
    assert '"start": "ImageNet weights' in (tmp_path / "eval" / "auc.json").read_text()


def test_offline_without_cached_weights_exits_2_before_training(tmp_path, torch_home, offline, tiny_config, capsys):
    root = tmp_path / "phantoms"
    cfg_path = tmp_path / "c.yaml"
    tiny_config("model.pretrained=imagenet", f"data.root={root}").dump(cfg_path)
    assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    folder = torch_home / "hub" / "checkpoints"
    assert RESNET18_FILE in err and f"{folder}/" in err and "model.pretrained: none" in err
    # Nothing was trained or generated, and no partial download is left behind.
    assert not (tmp_path / "run").exists() and not root.exists()
    assert not list(folder.glob("*"))


def test_unset_start_is_an_error_and_none_means_random(tmp_path, tiny_config, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg = tiny_config(f"data.root={tmp_path / 'phantoms'}")
    cfg.model.pretrained = None
    cfg.dump(cfg_path)
    assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained is not set" in err and "imagenet" in err and "none" in err
    with pytest.raises(ConfigError, match="not set"):
        check_start_weights(ModelConfig(backbone="resnet18"))
    assert check_start_weights(ModelConfig(backbone="resnet18", pretrained="none")) is None
    with pytest.raises(MissingFileError, match="does not exist"):
        check_start_weights(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "nope.pth")))
    assert describe_start(ModelConfig(pretrained="none")) == "random weights (model.pretrained: none)"


def test_paper_configs_start_from_imagenet():
    from pathlib import Path

    from agcnn.config import Config

    for path in sorted(Path(__file__).parents[2].glob("configs/agcnn_*.yaml")):
        assert Config.load(path).model.pretrained == "imagenet", path.name
