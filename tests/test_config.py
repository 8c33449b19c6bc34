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
    assert Config.from_dict({"train": {"global": {"lr": 1}}}).train.global_.lr == 1.0


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


# One row per constrained field: a value that must be refused, and what the message must say.
BAD_VALUES = [
    ("model.backbone=resnet5", r"model.backbone='resnet5' is not a valid choice; valid: resnet50, densenet121, resnet18\. Did you mean 'resnet50'"),
    ("model.attention=SE", r"model.attention='SE'.*valid: none, se, self, mhsa"),
    ("model.pool=mean", r"model.pool='mean'.*valid: max, avg"),
    ("model.threshold=1.5", r"model.threshold=1.5 is out of range; it must be in \[0, 1\)"),
    ("model.threshold=-0.1", r"model.threshold=-0.1 .*\[0, 1\)"),
    ("model.local_size=16", r"model.local_size=16 .*>= 32"),
    ("model.pretrained=''", r"model.pretrained='' must not be empty"),
    ("model.dropout=1.0", r"model.dropout=1.0 .*\[0, 1\)"),
    ("model.width=0", r"model.width=0 .*>= 1"),
    ("data.dataset=chestxray", r"data.dataset='chestxray' .*valid: synthetic, chestxray14, csv\. Did you mean 'chestxray14'"),
    ("data.root=' '", r"data.root=' ' must not be empty"),
    ("data.metadata=''", r"data.metadata="),
    ("data.train_list=''", r"data.train_list='' must not be empty"),
    ("data.val_list=''", r"data.val_list="),
    ("data.test_list=''", r"data.test_list="),
    ("data.cache=''", r"data.cache="),
    ("data.path_column=''", r"data.path_column="),
    ("data.patient_column=''", r"data.patient_column="),
    ("data.views=[PA, '']", r"data.views=\['PA', ''\] must list view positions"),
    ("data.val_fraction=3", r"data.val_fraction=3.0 .*\[0, 1\)"),
    ("data.test_fraction=1", r"data.test_fraction=1.0 .*\[0, 1\)"),
    ("data.split_seed=-1", r"data.split_seed=-1 .*>= 0"),
    ("data.resize=0", r"data.resize=0 .*>= 1"),
    ("data.image_size=16", r"data.image_size=16 .*>= 32"),
    ("data.highres_size=0", r"data.highres_size=0"),
    ("data.augment=papr", r"data.augment='papr' is not a valid choice; valid: paper, resized_crop\. Did you mean 'paper'"),
    ("data.crop_scale=[0.5, 0.2]", r"data.crop_scale=\[0.5, 0.2\] must be two area fractions"),
    ("data.crop_scale=[0.5]", r"data.crop_scale=\[0.5\] must be two area fractions"),
    ("data.cache_size=4", r"data.cache_size=4 .*>= 8"),
    ("data.augment_on=gpu", r"data.augment_on='gpu' .*valid: auto, device, loader"),
    ("data.num_workers=-1", r"data.num_workers=-1 .*>= 0"),
    ("data.synthetic_count=0", r"data.synthetic_count=0"),
    ("data.synthetic_size=32", r"data.synthetic_size=32 .*>= 64"),
    ("data.synthetic_seed=-2", r"data.synthetic_seed=-2"),
    ("train.seed=-1", r"train.seed=-1"),
    ("train.device=gpu", r"train.device='gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:x", r"train.device='cuda:x'"),
    ("train.inference_precision=fp16", r"train.inference_precision='fp16' is not a valid choice; valid: fp32, bf16"),
    ("train.bootstrap=-5", r"train.bootstrap=-5"),
    ("train.log_every=0", r"train.log_every=0"),
    ("train.global.epochs=0", r"train.global.epochs=0 is out of range; it must be >= 1"),
    ("train.local.batch_size=0", r"train.local.batch_size=0"),
    ("train.fusion.lr=-0.1", r"train.fusion.lr=-0.1 .*>= 0"),
    ("train.global.momentum=1", r"train.global.momentum=1.0 .*\[0, 1\)"),
    ("train.global.weight_decay=-1", r"train.global.weight_decay=-1.0"),
    ("train.global.lr_step=0", r"train.global.lr_step=0"),
    ("train.global.lr_gamma=0", r"train.global.lr_gamma=0.0 .*\(0, 1\]"),
    ("model.heatmap=gradcam", r"model.heatmap='gradcam' is not a valid choice; valid: channels, cam, uncertain"),
    ("model.global_stride=8", r"model.global_stride=8 is not a valid choice; valid: 32, 16"),
    ("train.global.optimizer=adam", r"train.global.optimizer='adam' is not a valid choice; valid: sgd, adamw"),
    ("train.local.schedule=onecycle", r"train.local.schedule='onecycle' is not a valid choice; valid: step, cosine"),
    ("labels=[]", r"labels=\[\] must be a non-empty list of distinct label names"),
    ("labels=[Mass, Mass]", r"labels=\['Mass', 'Mass'\]"),
    # Rules that relate two fields.
    ("data.resize=100", r"data.resize=100 is smaller than data.image_size=224"),
    ("data.highres_size=128", r"data.highres_size=128 is smaller than data.image_size=224"),
    ("data.label_map={Nodules: Nodle}", r"data.label_map maps onto \['Nodle'\].*Did you mean 'Nodule'"),
]


@pytest.mark.parametrize("override,match", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_fail_at_load_naming_key_value_and_what_is_valid(override, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, [override])


GOOD_VALUES = [
    "model.threshold=0", "model.threshold=0.95", "model.pretrained=null", "model.dropout=0.5", "data.val_fraction=0",
    "train.fusion.lr=0", "train.global.lr_gamma=1", "train.device=cuda:1", "train.device=cpu", "data.views=[]",
    "data.metadata=null", "data.crop_scale=[1, 1]", "data.label_map={Nodules: Nodule}", "train.bootstrap=0",
]


@pytest.mark.parametrize("override", GOOD_VALUES)
def test_edge_values_that_are_valid_load(override):
    Config.load(None, [override])


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        Config.load(None, ["model.backbone=resnet5", "data.val_fraction=3", "train.global.epochs=0"])
    msg = str(info.value)
    assert msg.startswith("3 invalid config values:")
    for key in ("model.backbone", "data.val_fraction", "train.global.epochs"):
        assert key in msg


def test_yaml_values_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  threshold: 1.5\n")
    with pytest.raises(ConfigError, match=r"model.threshold=1.5"):
        Config.load(path)


def test_every_constrained_field_has_a_bad_value_row():
    """A new field with a check is added to the table above (fields without one are free text)."""
    import dataclasses

    def constrained(obj, where=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = where + f.name.rstrip("_")
            if dataclasses.is_dataclass(value):
                yield from constrained(value, key + ".")
            elif "check" in f.metadata:
                yield key

    tested = {o.split("=")[0] for o, _ in BAD_VALUES}
    stages = {"train.global", "train.local", "train.fusion"}
    untested = []
    for key in constrained(Config()):
        section, _, name = key.rpartition(".")
        if section in stages and any(f"{s}.{name}" in tested for s in stages):
            continue
        if key not in tested:
            untested.append(key)
    assert not untested, f"no BAD_VALUES row for {untested}"


def test_menus_match_the_modules_that_use_them():
    from agcnn import config
    from agcnn.models.agcnn import AGCNN  # noqa: F401 - the models import the menus they accept
    from agcnn.models.attention import create_attention

    for kind in config.ATTENTION_KINDS:
        if kind != "none":
            assert create_attention(kind, 64) is not None


@pytest.mark.parametrize("overrides,match", [
    (["model.backbone=densenet121", "model.width=32"], r"model.width=32 applies to the ResNet backbones only"),
    (["model.backbone=densenet121", "model.global_stride=16"], r"model.global_stride=16 applies to the ResNet backbones only"),
    (["model.width=32", "model.pretrained=weights.pth"], r"model.width=32 cannot load ImageNet weights"),
])
def test_width_other_than_64_needs_a_resnet_from_scratch(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, overrides)
