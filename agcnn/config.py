"""One typed configuration for every command.

YAML in, ``--set section.key=value`` overrides, every key and type checked. An unknown key
fails loudly and suggests the nearest valid one; the resolved configuration is written beside
every run and stored inside every checkpoint, so ``evaluate`` and ``predict`` rebuild the model
from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agcnn.labels import LABELS


class ConfigError(ValueError):
    """A configuration value or key is not valid; the message names it and the fix."""


@dataclass
class ModelConfig:
    # resnet50 (paper default), densenet121 (the paper's second backbone), resnet18 (quick CPU runs).
    backbone: str = "resnet50"
    # Attention blocks in both branches: none | se | self | mhsa (see agcnn.models.attention).
    attention: str = "none"
    # Pool5: the paper uses global max pooling (Sec. 3.1); "avg" is the torchvision default.
    pool: str = "max"
    # tau in the paper's Eq. 4: the heatmap threshold that defines the attended region.
    threshold: float = 0.7
    # Side of the square crop that the local branch sees (the paper resizes to 224).
    local_size: int = 224
    # torchvision-format ImageNet weights on local disk; never downloaded.
    pretrained: str | None = None
    # Dropout before the classifiers; 0 as in the paper.
    dropout: float = 0.0


@dataclass
class DataConfig:
    # synthetic (generated phantoms) | chestxray14 | csv (your own export).
    dataset: str = "synthetic"
    # Folder with the images (chestxray14, csv) or where phantoms are generated (synthetic).
    root: str = "data/phantoms"
    # chestxray14: Data_Entry_2017*.csv(.gz) and the official split lists; csv: the labels table.
    metadata: str | None = None
    train_list: str | None = None
    # Optional fixed validation list (e.g. CheXNet's val_list.txt); None = carve it from train_list.
    val_list: str | None = None
    test_list: str | None = None
    # csv datasets: which column holds the image path and which the patient, and how the
    # table's label columns map onto the label list (empty = same names).
    path_column: str = "path"
    patient_column: str | None = "patient"
    label_map: dict[str, str] = field(default_factory=dict)
    # Restrict to these view positions (e.g. [PA]); empty keeps every view.
    views: list[str] = field(default_factory=list)
    # Validation is carved patient-wise from train_val with this seed; the test list is never
    # used for selection.
    val_fraction: float = 0.1
    split_seed: int = 0
    # csv tables without a split column: this fraction of patients is held out as the test set.
    test_fraction: float = 0.2
    # Global input: resize to `resize`, crop `image_size` (paper: 256 / 224).
    resize: int = 256
    image_size: int = 224
    # Training crop: RandomResizedCrop keeping this range of the image's area (torchvision's
    # default 8-100 %). Small training sets with small findings want a narrower range, since a
    # crop can cut the finding out while its label stays on.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # Side of the copy the local branch crops from. Equal to image_size: crop from the same
    # image the global branch saw (the paper). Larger: same field of view at higher resolution.
    highres_size: int = 224
    # Preprocessed cache written by `agcnn prepare` (None = decode the originals every epoch).
    cache: str | None = None
    cache_size: int = 512
    num_workers: int = 2
    # Phantom set (dataset: synthetic).
    synthetic_count: int = 600
    synthetic_size: int = 512
    synthetic_seed: int = 0


@dataclass
class StageConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # The paper divides the learning rate by 10 every 20 epochs.
    lr_step: int = 20
    lr_gamma: float = 0.1


def _stage(batch_size: int) -> Any:
    return field(default_factory=lambda: StageConfig(batch_size=batch_size))


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"
    # bf16 autocast on CUDA; ignored on the CPU.
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    # Paper batch sizes: 128 (global), 64 (local), 64 (fusion).
    global_: StageConfig = _stage(128)
    local: StageConfig = _stage(64)
    fusion: StageConfig = _stage(64)
    # The paper's Table II "G L F*": fine-tune both branches in stage III instead of freezing them.
    finetune_all: bool = False
    # Stage III starts its fusion head as the global classifier (zero weight on local features),
    # rather than at random; see AGCNN.init_fusion_from_global.
    fusion_from_global: bool = True
    # Stage III with both branches frozen: compute their pool5 features once (un-augmented
    # training images) and train the fusion head on them every epoch. False: augmented images
    # through both branches every epoch, as in the paper's training code.
    cache_fusion_features: bool = True
    # Bootstrap resamples for confidence intervals in evaluate.
    bootstrap: int = 1000
    log_every: int = 20


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    labels: list[str] = field(default_factory=lambda: list(LABELS))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "Config":
        return _build(cls, raw or {}, "")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "Config":
        raw: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file (see configs/)")
            raw = yaml.safe_load(path.read_text()) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(raw).__name__}")
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def stage(self, name: str) -> StageConfig:
        return {"global": self.train.global_, "local": self.train.local, "fusion": self.train.fusion}[name]


# ---------------------------------------------------------------------- helpers

def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else a ValueError naming it, the valid
    choices and the nearest one (the one place where a name is checked against a menu)."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}.{hint}")
    return value


def _key(f: dataclasses.Field) -> str:
    """YAML name of a field: ``global_`` is spelled ``global`` (a Python keyword)."""
    return f.name.rstrip("_")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(valid)}"


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"unknown config key {(where + '.' if where else '') + str(k)!r}" + _suggest(str(k), list(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_key(f): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override to a raw config mapping.

    The value is parsed as YAML (``true``, ``3``, ``[PA, AP]``, ``null``); types and key names are
    checked when the mapping is turned into a :class:`Config`.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.seed=1)")
    dotted, text = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    # Check the key path against the schema here, so the error points at the override.
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            break
        fields = {_key(f): f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in --set {item!r}" + _suggest(part, list(fields)))
        cls = typing.get_type_hints(cls)[fields[part].name]
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
