"""Backbones: torchvision ResNet / DenseNet with optional attention blocks, as feature extractors.

Parameter names stay those of torchvision (``layer4.2.conv2.weight``), so torchvision-format
ImageNet weights load directly; attention blocks add keys of their own and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import DenseNet, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from agcnn.config import BACKBONES, IMAGENET_WEIGHTS, check_choice
from agcnn.errors import ConfigError, MissingFileError
from agcnn.fileio import sha256_file
from agcnn.models.attention import AttentionBlock, get_attention

# An attention constructor: channels -> module (see agcnn.models.attention).
AttentionMaker = Callable[[int], nn.Module]


class _AttentionPoints(nn.Module):
    """Gives a torchvision residual block two attention points, identities until set.

    ``spatial_attn`` sits after the 3x3 convolution, where SASA/BoTNet put attention;
    ``channel_attn`` on the residual branch before the addition, as in SE-ResNet.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spatial_attn: nn.Module = nn.Identity()
        self.channel_attn: nn.Module = nn.Identity()


class AttentiveBottleneck(_AttentionPoints, Bottleneck):
    """torchvision's Bottleneck with the two attention points."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.spatial_attn(self.relu(self.bn2(self.conv2(out))))
        out = self.channel_attn(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


class AttentiveBasicBlock(_AttentionPoints, BasicBlock):
    """torchvision's BasicBlock with the two attention points."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.spatial_attn(self.relu(self.bn1(self.conv1(x))))
        out = self.channel_attn(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ResNetFeatures(nn.Module):
    """ResNet up to ``layer4``: returns the last feature map [B, C, H/32, W/32] (``H/16`` with
    ``output_stride=16``: layer4 at stride 1)."""

    def __init__(self, block: type[nn.Module], layers: list[int], *, width: int = 64, output_stride: int = 32,
                 channel_attn: AttentionMaker | None = None, spatial_attn: AttentionMaker | None = None) -> None:
        super().__init__()
        net = ResNet(block, layers)  # type: ignore[arg-type]
        if width != 64:
            # torchvision fixes the first stage at 64 channels; rebuild the stem and the stages
            # with its own _make_layer at another width (same module names, same structure).
            norm = net._norm_layer
            net.inplanes = width
            net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            net.bn1 = norm(width)
            net.layer1 = net._make_layer(block, width, layers[0])
            net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
            net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
            net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if output_stride == 16:
            # layer4 at stride 1: its first block's strided convolution (conv2 in torchvision's
            # Bottleneck, conv1 in BasicBlock) and its shortcut. Same weights, a 2x finer map.
            first = net.layer4[0]
            (first.conv2 if issubclass(block, Bottleneck) else first.conv1).stride = (1, 1)
            first.downsample[0].stride = (1, 1)
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 32 or 16, got {output_stride}")
        # Same names as torchvision's ResNet, minus avgpool/fc (pool5 and the heads are ours).
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.num_features = 8 * width * getattr(block, "expansion", 1)
        if channel_attn is not None:
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for blk in layer:
                    out_ch = blk.bn3.num_features if hasattr(blk, "bn3") else blk.bn2.num_features
                    blk.channel_attn = channel_attn(out_ch)
        if spatial_attn is not None:
            # Last stage only: where SASA (Sec. 4.3) found attention helps most.
            for blk in self.layer4:
                blk.spatial_attn = spatial_attn(blk.conv2.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DenseNetFeatures(nn.Module):
    """DenseNet-121 ``features`` plus the final ReLU torchvision applies in ``forward``."""

    def __init__(self, *, channel_attn: AttentionMaker | None = None, spatial_attn: AttentionMaker | None = None) -> None:
        super().__init__()
        net = DenseNet(32, (6, 12, 24, 16), 64)
        stages: list[tuple[str, nn.Module]] = []
        for name, module in net.features.named_children():
            if name == "norm5" and spatial_attn is not None:
                stages.append(("attn4", spatial_attn(1024)))
            stages.append((name, module))
            if name.startswith("denseblock") and channel_attn is not None:
                # Dense layers concatenate rather than add, so SE goes on each block's output.
                stages.append((f"se{name[-1]}", channel_attn(module_out_channels(module))))
        self.features = nn.Sequential(OrderedDict(stages))
        self.num_features = 1024

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.features(x))


def module_out_channels(block: nn.Module) -> int:
    layers = list(block.children())
    first, last = layers[0], layers[-1]
    growth = last.conv2.out_channels
    return first.norm1.num_features + growth * len(layers)


def check_backbone(name: str) -> str:
    return check_choice("backbone", name, BACKBONES)


def create_backbone(name: str, attention: str = "none", width: int = 64, output_stride: int = 32) -> nn.Module:
    """Feature extractor ``name`` with ``attention`` blocks; has ``.num_features``.

    ``width``: channels of a ResNet's first stage (64: torchvision's); DenseNet has only 64.
    ``output_stride``: 32, or 16 for a ResNet whose last stage keeps its input's resolution.
    """
    check_backbone(name)
    layer = get_attention(attention)
    if width != 64 and not name.startswith("resnet"):
        raise ValueError(f"width={width} applies to the ResNet backbones only; use width 64 with {name}")
    if output_stride != 32 and not name.startswith("resnet"):
        raise ValueError(f"output_stride={output_stride} applies to the ResNet backbones only; use 32 with {name}")
    attn = {} if layer is None else {layer.site: layer.make}
    res = {"width": width, "output_stride": output_stride}
    builders: dict[str, Callable[[], nn.Module]] = {
        "resnet50": lambda: ResNetFeatures(AttentiveBottleneck, [3, 4, 6, 3], **res, **attn),
        "resnet18": lambda: ResNetFeatures(AttentiveBasicBlock, [2, 2, 2, 2], **res, **attn),
        "densenet121": lambda: DenseNetFeatures(**attn),
    }
    return builders[name]()


def attention_keys(features: nn.Module) -> set[str]:
    """The state-dict keys of the attention blocks in ``features`` (no ImageNet file has them)."""
    return {
        f"{name}.{key}"
        for name, module in features.named_modules()
        if isinstance(module, AttentionBlock)
        for key in module.state_dict()
    }


# ---------------------------------------------------------------------------- pretrained weights

def _remap_densenet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Old torchvision DenseNet files spell "norm.1" for "norm1" (see torchvision densenet.py).
    out = {}
    for k, v in state.items():
        for old, new in ((".norm.", ".norm"), (".relu.", ".relu"), (".conv.", ".conv")):
            parts = k.split(old)
            if len(parts) == 2 and parts[1][:1].isdigit():
                k = parts[0] + new + parts[1]
        out[k] = v
    return out


def imagenet_file(backbone: str) -> tuple[str, str, Path]:
    """``(weights name, url, cached file)`` of the ImageNet weights ``model.pretrained: imagenet``
    loads for ``backbone``: torchvision's weights enum, and the file torch hub keeps it in
    (``$TORCH_HOME/hub/checkpoints/<name>``, the same path torchvision's own ``get_state_dict`` uses)."""
    from urllib.parse import urlparse

    from torchvision.models import get_weight

    name = IMAGENET_WEIGHTS[check_backbone(backbone)]
    url = get_weight(name).url
    return name, url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def fetch_imagenet(backbone: str, progress: bool = True) -> Path:
    """The local file of ``backbone``'s ImageNet weights, downloaded by torchvision into torch
    hub's cache when it is not there yet. Offline and not cached: a :class:`MissingFileError`
    (exit 2) naming the file and the folder to put it in."""
    name, url, path = imagenet_file(backbone)
    if path.is_file():
        return path
    from torchvision.models import get_weight

    try:
        # torchvision's own download into torch hub's cache; check_hash: the file's name carries
        # the first digits of its sha256, so a cut-off download is not kept as the weights.
        get_weight(name).get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # noqa: BLE001 - URLError, timeouts, proxies, a hash mismatch: all mean "not here"
        path.unlink(missing_ok=True)
        raise MissingFileError(
            f"model.pretrained: imagenet needs torchvision's {name} weights, the file {path.name}, which is not in "
            f"torch hub's cache and could not be downloaded ({type(e).__name__}: {e}). Download {url} on a machine "
            f"with network and put it in {path.parent}/ (set TORCH_HOME to use another cache folder), or set "
            f"model.pretrained: none to train from random weights"
        ) from e
    if not path.is_file():
        raise MissingFileError(f"torchvision reported {name} downloaded, but {str(path)!r} is not there; check TORCH_HOME")
    return path


def start_weights_file(model_cfg) -> Path | None:
    """The file ``model.pretrained`` names (``imagenet``: fetched, see :func:`fetch_imagenet`), or
    None for random weights (``none``, or unset: only a checkpoint's own weights follow)."""
    p = model_cfg.pretrained
    if p is None or p == "none":
        return None
    if p == "imagenet":
        return fetch_imagenet(model_cfg.backbone)
    return Path(p)


def check_start_weights(model_cfg) -> Path | None:
    """Before a stage trains from its start weights: ``model.pretrained`` is set, and the file it
    names is here (ImageNet weights downloaded if need be). Errors exit 2, before any training."""
    if model_cfg.pretrained is None:
        raise ConfigError(
            "model.pretrained is not set; say where the branches start: model.pretrained: imagenet (torchvision's "
            "ImageNet weights, as the paper, Sec. III-C), model.pretrained: none (random weights), or the path of "
            "a torchvision-format weights file"
        )
    path = start_weights_file(model_cfg)
    if path is not None and not path.is_file():
        raise MissingFileError(
            f"model.pretrained={model_cfg.pretrained!r} does not exist; set it to a local torchvision state-dict file "
            f"(e.g. resnet50-0676ba61.pth), to imagenet, or to none to start from random weights"
        )
    return path


def load_pretrained(features: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load torchvision-format ImageNet weights from a local file into a feature extractor.

    The ImageNet classifier (``fc.*`` / ``classifier.*``) is dropped. Keys the file lacks may only
    be those of attention blocks; anything else is an error, since it would mean training from
    partly random weights without saying so. Returns what was missing and dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"pretrained weights {str(path)!r} not found; set model.pretrained to a local torchvision "
            f"state-dict file (e.g. resnet50-0676ba61.pth), to imagenet, or to none to start from random weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ConfigError(f"cannot read pretrained weights {str(path)!r}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = _remap_densenet_keys(dict(state))
    dropped = sorted(k for k in state if k.startswith(("fc.", "classifier.")))
    for k in dropped:
        del state[k]
    own = features.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise ConfigError(
            f"pretrained weights {str(path)!r} do not match this backbone: {len(wrong_shape)} tensors have "
            f"other shapes (first: {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here). "
            f"Use a torchvision file for the same backbone."
        )
    result = features.load_state_dict(state, strict=False)
    new_keys = attention_keys(features)
    bad_missing = [k for k in result.missing_keys if k not in new_keys]
    if bad_missing or result.unexpected_keys:
        raise ConfigError(
            f"pretrained weights {str(path)!r} do not match this backbone: missing {bad_missing[:5]}"
            f"{'…' if len(bad_missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'…' if len(result.unexpected_keys) > 5 else ''}. Use a torchvision file for the same backbone."
        )
    return {"missing": list(result.missing_keys), "dropped": dropped, "sha256": [sha256_file(path)]}
