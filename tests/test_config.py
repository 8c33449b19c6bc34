"""Typed config: YAML, overrides, unknown keys and wrong types rejected with a suggestion."""

from __future__ import annotations

import pytest

from agcnn.config import Config, ConfigError
from agcnn.labels import LABELS


def test_defaults_round_trip(tmp_path):
    cfg = Config()
    path = tmp_path / "c.yaml"
    cfg.dump(path)
    again = Config.load(path)
    assert again == cfg
    assert again.labels == list(LABELS)
    # "global" is a Python keyword in attribute form; YAML spells it plainly.
    assert "global" in cfg.to_dict()["train"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: resnet18\ntrain:\n  global:\n    epochs: 3\n")
    cfg = Config.load(path, ["train.global.lr=0.5", "data.views=[PA, AP]", "model.pretrained=null", "train.amp=false"])
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.global_.epochs == 3 and cfg.train.global_.lr == 0.5
    assert cfg.data.views == ["PA", "AP"]
    assert cfg.model.pretrained is None and cfg.train.amp is False
    assert cfg.stage("global") is cfg.train.global_


def test_int_accepted_where_float_expected():
    assert Config.from_dict({"model": {"threshold": 1}}).model.threshold == 1.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.backbon=resnet18"], r"unknown config key 'model.backbon'.*did you mean 'backbone'"),
        (["trian.seed=1"], r"unknown config key 'trian'.*did you mean 'train'"),
        (["train.seed=abc"], r"train.seed must be an integer, got 'abc'"),
        (["train.amp=3"], r"train.amp must be true or false"),
        (["data.views=PA"], r"data.views must be a list"),
        (["seed"], r"not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, overrides)


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  treshold: 0.5\n")
    with pytest.raises(ConfigError, match=r"'model.treshold'.*did you mean 'threshold'"):
        Config.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.yaml")
