"""One typed configuration for every command.

YAML in, ``--set section.key=value`` overrides, every key and type checked. An unknown key
fails loudly and suggests the nearest valid one; the resolved configuration is written beside
every run and stored inside every checkpoint, so ``evaluate`` and ``predict`` rebuild the model
from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agcnn.errors import ConfigError
from agcnn.labels import LABELS

__all__ = ["Config", "DataConfig", "ModelConfig", "StageConfig", "TrainConfig", "apply_override", "check_choice",
           "describe_start", "setting", "valid_device", "Check", "OneOf", "Range", "Rule"]


# ---------------------------------------------------------------------- value checks
#
# Every field that has a meaningful constraint declares it beside its default with
# ``setting(default, check)``; :meth:`Config.__post_init__` runs them all (and the few rules that
# relate two fields, :func:`_cross_checks`) so a bad value fails when the config is loaded, with
# the key, the value and what would be valid -- not hours later inside training.

# The names the config accepts. The modules that turn a name into a class import these menus.
BACKBONES = ("resnet50", "densenet121", "resnet18")
ATTENTION_KINDS = ("none", "se", "self", "mhsa")
POOLS = ("max", "avg")
# What the attended region is drawn from (agcnn.models.roi): the paper's heatmap, or class activation maps.
HEATMAPS = ("channels", "cam", "uncertain")
# Reduction of the global branch's last feature map (agcnn.models.backbones.ResNetFeatures).
GLOBAL_STRIDES = (32, 16)
DATASETS = ("synthetic", "chestxray14", "csv")
# Where the training and evaluation transforms run (data.augment_on).
AUGMENT_PLACES = ("auto", "device", "loader")
# Training augmentations (agcnn.data.transforms): the paper's plain random crop, or zoom.
AUGMENTS = ("paper", "resized_crop")
# model.pretrained's two names (anything else is a file path), and the torchvision weights
# "imagenet" means for each backbone: the first ImageNet weights torchvision published (V1), the
# ones a 2018 paper could start from; later recipes (V2) were trained differently.
PRETRAINED_NAMES = ("imagenet", "none")
IMAGENET_WEIGHTS = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
}
# Inference precisions (agcnn.precision).
PRECISIONS = ("fp32", "bf16")
# Stage optimisers and learning-rate schedules (agcnn.train.step.build_optimizer).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
# How a finding's map is drawn (agcnn.explain): class activation maps, or Grad-CAM.
EXPLAIN_METHODS = ("cam", "gradcam")
# Device names every command accepts (train.device, --device): agcnn.runtime.resolve_device.
DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


class Check:
    """One constraint on a config value: ``problem(value)`` says what is wrong, or None."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class OneOf(Check):
    """A name from a fixed menu; the error suggests the nearest one (MONAI's ``look_up_option``)."""

    choices: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        if value in self.choices:
            return None
        names = tuple(str(c) for c in self.choices)
        return f"is not a valid choice; valid: {', '.join(names)}.{_did_you_mean(str(value), names)}"


@dataclass(frozen=True)
class Range(Check):
    """A number in an interval; either end may be open or absent."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: Any) -> str | None:
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if not (below or above) and value == value:  # NaN is never in range
            return None
        return f"is out of range; it must be {self.describe()}"

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class Rule(Check):
    """Any other constraint: a predicate and the requirement it stands for ("must be ...")."""

    ok: Callable[[Any], bool]
    requirement: str

    def problem(self, value: Any) -> str | None:
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):
            good = False
        return None if good else self.requirement


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
FRACTION = Range(0.0, 1.0, hi_open=True)  # [0, 1)
NOT_EMPTY = Rule(lambda v: bool(str(v).strip()), "must not be empty")


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *,
            factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a default (or ``factory``) and the :class:`Check` its value must pass."""
    meta = {"check": check} if check is not None else {}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _nearest(name: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _did_you_mean(name: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def valid_device(name: str) -> bool:
    """Whether ``name`` is one of the device names (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    return isinstance(name, str) and DEVICE_NAMES.fullmatch(name) is not None


def _crop_scale_ok(v: list[float]) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1] <= 1


# ---------------------------------------------------------------------- the sections

@dataclass
class ModelConfig:
    # resnet50 (paper default), densenet121 (the paper's second backbone), resnet18 (quick CPU runs).
    backbone: str = setting("resnet50", OneOf(BACKBONES))
    # Attention blocks in both branches: none | se | self | mhsa (see agcnn.models.attention).
    attention: str = setting("none", OneOf(ATTENTION_KINDS))
    # Pool5: the paper uses global max pooling (Sec. 3.1); "avg" is the torchvision default.
    pool: str = setting("max", OneOf(POOLS))
    # tau in the paper's Eq. 4: the heatmap threshold that defines the attended region. The
    # heatmap is min-max normalised, so 1 or more would select nothing.
    threshold: float = setting(0.7, FRACTION)
    # The heatmap thresholded at tau. "channels": the paper's, the largest |activation| over all
    # channels of the global feature map (Eq. 3). "cam": the largest class activation map over the
    # findings (the global classifier's weights on the same map; not the paper's). "uncertain":
    # the class activation maps weighted by p (1 - p) of the global probability and summed
    # (Grad-CAM of the summed probabilities): the box goes to what the global branch cannot yet
    # call, not to a finding it is already sure of. On the phantoms (`agcnn demo --long`'s global
    # branch) the box held 68, 66 and 115 of 141 validation nodules; on films that also carry a
    # large finding 6, 2 and 45 of 69.
    heatmap: str = setting("channels", OneOf(HEATMAPS))
    # 16: the global branch's last stage keeps the resolution of the one before (stride 1 instead
    # of 2), so its feature map -- and the heatmap drawn from it -- is twice as fine (8 x 8 instead
    # of 4 x 4 at a 128 px input; 14 x 14 at 224). About 1.3x the time of a global epoch; the
    # weights are the same shapes, so ImageNet weights still load. ResNet backbones only.
    global_stride: int = setting(32, OneOf(GLOBAL_STRIDES))
    # Side of the square crop that the local branch sees (the paper resizes to 224).
    local_size: int = setting(224, Range(32))  # ResNet / DenseNet reduce 32x
    # Where both branches start (paper Sec. III-C fine-tunes ImageNet weights): "imagenet" --
    # torchvision's own ImageNet weights for the backbone (IMAGENET_WEIGHTS), read from torch
    # hub's cache ($TORCH_HOME/hub/checkpoints) and downloaded there when absent and the machine
    # is online; "none" -- random weights; or the path of a torchvision-format state-dict file.
    # No default: a run that trains a stage from scratch must say which (agcnn.models.backbones.
    # check_start_weights), since random weights trained silently where ImageNet was meant.
    pretrained: str | None = setting(None, NOT_EMPTY)
    # Dropout before the classifiers; 0 as in the paper.
    dropout: float = setting(0.0, FRACTION)
    # Channels of a ResNet's first stage (the later stages have 2, 4, 8 times as many). 64 is
    # torchvision's and the only width ImageNet weights fit; fewer train faster from scratch.
    width: int = setting(64, AT_LEAST_1)
    # The paper's label vector has 15 entries: the 14 findings and "No Finding" (Sec. 4.1). True
    # adds that 15th output to every classifier, trained on "no finding is positive"; it is only
    # a training target: AUC, operating points and every output file keep the 14 findings.
    # Default False: unlike the other recipe choices it is tied to a label list that covers
    # what a film can show (ChestX-ray14's); on a site's own subset of findings, "none of these"
    # is not "normal". The paper configs set it.
    no_finding: bool = False


@dataclass
class DataConfig:
    # synthetic (generated phantoms) | chestxray14 | csv (your own export).
    dataset: str = setting("synthetic", OneOf(DATASETS))
    # Folder with the images (chestxray14, csv) or where phantoms are generated (synthetic).
    root: str = setting("data/phantoms", NOT_EMPTY)
    # chestxray14: Data_Entry_2017*.csv(.gz) and the official split lists; csv: the labels table.
    metadata: str | None = setting(None, NOT_EMPTY)
    train_list: str | None = setting(None, NOT_EMPTY)
    # Optional fixed validation list (e.g. CheXNet's val_list.txt); None = carve it from train_list.
    val_list: str | None = setting(None, NOT_EMPTY)
    test_list: str | None = setting(None, NOT_EMPTY)
    # csv datasets: which column holds the image path and which the patient, and how the
    # table's label columns map onto the label list (empty = same names).
    path_column: str = setting("path", NOT_EMPTY)
    patient_column: str | None = setting("patient", NOT_EMPTY)
    # csv tables without a patient column are refused: true splits them image by image instead,
    # and every report then says that patients may be on both sides.
    image_wise_split: bool = False
    label_map: dict[str, str] = field(default_factory=dict)
    # DICOM images must be frontal chest radiographs (agcnn.data.scope): a file whose header
    # names another body part or a lateral / oblique view stops training like an unreadable one.
    # These switch either check off (PNG / JPEG carry no such attributes and are never checked).
    any_body_part: bool = False
    any_view: bool = False
    # Restrict to these view positions (e.g. [PA]); empty keeps every view.
    views: list[str] = setting(factory=list, check=Rule(lambda v: all(str(x).strip() for x in v),
                                                         "must list view positions such as [PA, AP], none empty"))
    # Validation is carved patient-wise from train_val with this seed; the test list is never
    # used for selection.
    val_fraction: float = setting(0.1, FRACTION)
    split_seed: int = setting(0, AT_LEAST_0)
    # csv tables without a split column: this fraction of patients is held out as the test set.
    test_fraction: float = setting(0.2, FRACTION)
    # Global input: resize to `resize`, crop `image_size` (paper: 256 / 224).
    resize: int = setting(256, AT_LEAST_1)
    image_size: int = setting(224, Range(32))
    # Training augmentation (AUGMENTS, see agcnn.data.transforms): "paper" = resize, random
    # image_size crop, horizontal flip; "resized_crop" = RandomResizedCrop keeping crop_scale of
    # the area, then flip. Default "paper": Sec. IV-B says "randomly resized cropping", Fig. 1
    # "randomly cropped"; with the 256 resize and 224 crop the paper gives, both read as resize,
    # then a plain random crop (a 256 resize before a zoom crop would serve no purpose). Zoom
    # also cuts small findings out of a crop while their labels stay on, on any data set.
    augment: str = setting("paper", OneOf(AUGMENTS))
    # resized_crop only: the range of the image's area a training crop keeps (torchvision's
    # default 8-100 %). Small training sets with small findings want a narrower range, since a
    # crop can cut the finding out while its label stays on.
    crop_scale: list[float] = setting(factory=lambda: [0.08, 1.0], check=Rule(
        _crop_scale_ok, "must be two area fractions 0 < min <= max <= 1, e.g. [0.08, 1.0]"))
    # Side of the copy the local branch crops from. Equal to image_size: crop from the same
    # image the global branch saw (the paper). Larger: same field of view at higher resolution.
    highres_size: int = setting(224, AT_LEAST_1)
    # Preprocessed cache written by `agcnn prepare`. None: decode the originals every epoch, except
    # ChestX-ray14 training, which reads <root>/agcnn-cache-<cache_size> (agcnn.data.cache.cache_folder).
    cache: str | None = setting(None, NOT_EMPTY)
    cache_size: int = setting(512, Range(8))
    # An image that cannot be used: false (default) stops -- before training when its header is
    # wrong or the file is missing (every such row listed at once), at its batch when it fails to
    # decode. true leaves such rows out, lists them in the log, and counts them per epoch in
    # log.csv and the checkpoint (skipped_images).
    skip_unreadable: bool = False
    # ChestX-ray14 training without a cache: decode the 1024 px PNGs every epoch (~34 images/s per core).
    decode_originals: bool = False
    # Where resize / crop / flip / normalise run (AUGMENT_PLACES): "device" = per batch on the
    # training device from uint8 (agcnn.data.device_transforms; the loader only decodes),
    # "loader" = per image in the DataLoader workers, "auto" = device on CUDA, loader otherwise.
    augment_on: str = setting("auto", OneOf(AUGMENT_PLACES))
    num_workers: int = setting(2, AT_LEAST_0)
    # Phantom set (dataset: synthetic); the generator draws anatomy at 64 px or more.
    synthetic_count: int = setting(600, AT_LEAST_1)
    synthetic_size: int = setting(512, Range(64))
    synthetic_seed: int = setting(0, AT_LEAST_0)


@dataclass
class StageConfig:
    epochs: int = setting(50, AT_LEAST_1)
    batch_size: int = setting(128, AT_LEAST_1)
    # 0 is allowed: a stage that only re-reads its seed (tests, sanity checks).
    lr: float = setting(0.01, AT_LEAST_0)
    momentum: float = setting(0.9, FRACTION)
    weight_decay: float = setting(1e-4, AT_LEAST_0)
    # The paper divides the learning rate by 10 every 20 epochs.
    lr_step: int = setting(20, AT_LEAST_1)
    lr_gamma: float = setting(0.1, Range(0.0, 1.0, lo_open=True))
    # The paper's SGD with momentum; "adamw" (momentum is then beta1, weight decay decoupled)
    # trains small branches from scratch in far fewer epochs.
    optimizer: str = setting("sgd", OneOf(OPTIMIZERS))
    # "step": lr x lr_gamma every lr_step epochs (the paper's); "cosine": from lr down to 0 over
    # the stage's epochs, one step per epoch (lr_step and lr_gamma unused).
    schedule: str = setting("step", OneOf(SCHEDULES))


def _stage(batch_size: int) -> Any:
    return field(default_factory=lambda: StageConfig(batch_size=batch_size))


@dataclass
class TrainConfig:
    seed: int = setting(0, AT_LEAST_0)
    device: str = setting("auto", Rule(valid_device, "is not a device; use auto, cpu, cuda or cuda:N"))
    # bf16 autocast of the training steps on CUDA; ignored on the CPU.
    amp: bool = True
    # Precision of every score the model gives: training validation (which picks best.pt and its
    # operating points), evaluate and predict, on the CPU and CUDA alike: fp32 | bf16
    # (agcnn.precision). Stored with the checkpoint's config, so the three always agree.
    inference_precision: str = setting("fp32", OneOf(PRECISIONS))
    channels_last: bool = True
    compile: bool = False
    # Paper batch sizes: 128 (global), 64 (local), 64 (fusion).
    global_: StageConfig = _stage(128)
    local: StageConfig = _stage(64)
    fusion: StageConfig = _stage(64)
    # Under torchrun: batch norm of the trained branches as SyncBatchNorm (statistics over the
    # whole batch rather than each GPU's share; CUDA only).
    sync_batchnorm: bool = False
    # The paper's Table II "G L F*": fine-tune both branches in stage III instead of freezing them.
    finetune_all: bool = False
    # Stage III starts its fusion head as the global classifier (zero weight on local features),
    # rather than at random; see AGCNN.init_fusion_from_global. Default False, the paper's
    # (Sec. III-D: a new fully connected layer over both pool5 vectors); the demo sets true.
    fusion_from_global: bool = False
    # Stage II starts the local branch as a copy of the trained global branch (same
    # architecture, no weight sharing afterwards), rather than from its own start (ImageNet
    # weights or random); see AGCNN.init_local_from_global.
    local_from_global: bool = False
    # Stage III with both branches frozen: compute their pool5 features once (un-augmented
    # training images) and train the fusion head on them every epoch. False (default): augmented
    # images through both branches every epoch, as in the paper's training; true is faster and
    # trains the head without augmentation (the demo sets it for its CPU budget).
    cache_fusion_features: bool = False
    # Stage II with the global branch frozen: crop each training image's attended box once
    # (un-augmented images; the crops then flipped at random each epoch) and train the local
    # branch on those crops, instead of augmented images through the global branch every
    # epoch. About 3x faster on the CPU; the crops are held in memory (N x 3 x L x L: training
    # crops float16, validation crops float32).
    cache_local_crops: bool = False
    # Bootstrap resamples for confidence intervals in evaluate.
    bootstrap: int = setting(1000, AT_LEAST_0)
    log_every: int = setting(20, AT_LEAST_1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    labels: list[str] = setting(factory=lambda: list(LABELS), check=Rule(
        lambda v: len(v) > 0 and len(set(v)) == len(v) and all(str(x).strip() for x in v),
        "must be a non-empty list of distinct label names"))

    def __post_init__(self) -> None:
        problems = _field_problems(self, "") + _cross_checks(self)
        if len(problems) == 1:
            raise ConfigError(f"invalid config value: {problems[0]}")
        if problems:
            raise ConfigError(f"{len(problems)} invalid config values:" + "".join(f"\n  {p}" for p in problems))

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

def describe_start(model: ModelConfig) -> str:
    """Where a model's branches started, in words, for logs, checkpoints and reports."""
    p = model.pretrained
    if p == "imagenet":
        return f"ImageNet weights (torchvision {IMAGENET_WEIGHTS[model.backbone]})"
    if p == "none":
        return "random weights (model.pretrained: none)"
    if p is None:
        # Configs written before the value was required meant random weights by null.
        return "random weights (model.pretrained not set)"
    return f"weights from {Path(p).name} (model.pretrained)"


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else a :class:`ConfigError` naming it, the
    valid choices and the nearest one (for names checked outside a config, e.g. a stage)."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(choices)}.{_did_you_mean(str(value), choices)}")
    return value


def _field_problems(obj: Any, where: str) -> list[str]:
    """Every failed :class:`Check` in ``obj`` and its nested sections, as "key=value what is wrong"."""
    out = []
    for f in dataclasses.fields(obj):
        key = f"{where}{_key(f)}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _field_problems(value, key + ".")
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check.problem(value)
            if problem:
                out.append(f"{key}={value!r} {problem}")
    return out


def _cross_checks(cfg: "Config") -> list[str]:
    """Rules that relate two fields."""
    d, out = cfg.data, []
    if d.resize < d.image_size:
        out.append(f"data.resize={d.resize} is smaller than data.image_size={d.image_size}; "
                   f"the crop must fit inside the resized image")
    if d.highres_size < d.image_size:
        out.append(f"data.highres_size={d.highres_size} is smaller than data.image_size={d.image_size}; "
                   f"use highres_size >= image_size")
    m = cfg.model
    if m.width != 64 and not m.backbone.startswith("resnet"):
        out.append(f"model.width={m.width} applies to the ResNet backbones only; use width 64 with {m.backbone}")
    if m.global_stride != 32 and not m.backbone.startswith("resnet"):
        out.append(f"model.global_stride={m.global_stride} applies to the ResNet backbones only; use 32 with {m.backbone}")
    if m.width != 64 and m.pretrained not in (None, "none"):
        out.append(f"model.width={m.width} cannot load ImageNet weights (model.pretrained), which have width 64")
    unknown = [v for v in d.label_map.values() if v not in cfg.labels]
    if unknown:
        out.append(f"data.label_map maps onto {unknown}, which are not in the label list "
                   f"{cfg.labels}.{_did_you_mean(str(unknown[0]), cfg.labels)}")
    return out


def _key(f: dataclasses.Field) -> str:
    """YAML name of a field: ``global_`` is spelled ``global`` (a Python keyword)."""
    return f.name.rstrip("_")


def _suggest(name: str, valid: list[str]) -> str:
    return f"{_nearest(name, valid)} Valid keys: {', '.join(valid)}"


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
