"""Checkpoints: one self-describing file per stage, written atomically, loaded safely.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: a tampered file cannot run code. It carries the resolved
config and the label list, so ``evaluate`` and ``predict`` rebuild the model from it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agcnn import __version__
from agcnn.config import Config
from agcnn.errors import CheckpointError
from agcnn.fileio import atomic_write_bytes
from agcnn.labels import check_labels
from agcnn.models import AGCNN
from agcnn.stages import BRANCHES, STAGES, trained_by

FORMAT = "agcnn-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor], config: Config, **extra: Any) -> None:
    """Save model weights with the config, label list and any extra plain values."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "agcnn_version": __version__,
        "config": config.to_dict(),
        "labels": list(config.labels),
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        **extra,
    }
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; raise :class:`CheckpointError` with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the .pt file written by `agcnn train`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file; pass the .pt file written by `agcnn train`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {e.strerror}; check its permissions") from e
    except Exception as e:  # noqa: BLE001 - corrupt zip, pickle with code, truncated file...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded safely ({first}); it is corrupt, truncated, or not a "
            f"weights-only agcnn checkpoint. Re-copy it or re-run `agcnn train`"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an agcnn checkpoint (no '{FORMAT}' marker); pass a file written by `agcnn train`"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {ckpt['format_version']}, newer than this agcnn "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade agcnn"
        )
    cfg = Config.from_dict(ckpt["config"])
    check_labels(ckpt["labels"], cfg.labels, where=f"checkpoint {path.name}")
    return ckpt


def trained_branches(ckpt: dict[str, Any]) -> tuple[str, ...]:
    """The branches the checkpoint's training stage has trained; the others hold random weights."""
    stage = ckpt.get("stage")
    if stage is None:
        # No stage recorded: the checkpoint is taken to be a complete (fusion) model.
        return BRANCHES
    if stage not in STAGES:
        raise CheckpointError(f"checkpoint records stage {stage!r}; expected one of {list(STAGES)}")
    return trained_by(stage)


def model_from_checkpoint(ckpt: dict[str, Any], map_location: str | torch.device = "cpu"):
    """Rebuild the AG-CNN model of a loaded checkpoint; returns ``(model, config)``."""
    cfg = Config.from_dict(ckpt["config"])
    cfg.model.pretrained = None  # the checkpoint's own weights replace any ImageNet start
    model = AGCNN.from_config(cfg.model, num_classes=len(cfg.labels), image_size=cfg.data.image_size)
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), cfg
