"""One way from a checkpoint to scores: load the model for inference, score images with it.

:func:`load_for_inference` rebuilds the model of a checkpoint on a device, in eval mode and in
the checkpoint's memory format, and turns every way the file can be unusable into one
:class:`~agcnn.errors.CheckpointError` that names the file and the fix.

:func:`score` runs a model on a batch of normalised images at an inference precision
(:mod:`agcnn.precision`) and memory format, and returns the logits of every branch the pass
computed, the attended boxes and the attention heatmap; with ``classes`` it adds the class
activation maps (:mod:`agcnn.explain`) of those findings, computed from the same forward pass
(CAM) or with Grad-CAM's backward passes run at the same precision, so that a map is always the
map of the box the scores came from.

Every score of a checkpoint -- training validation, ``evaluate``, ``predict``, ``localize``, the
demo -- goes through :func:`score` with the checkpoint's ``train.inference_precision`` and
``train.channels_last``: an operating point chosen on validation scores is then applied to scores
computed the same way, and the box ``localize`` scores is the box ``predict`` writes.

Imports :mod:`agcnn.checkpoint`, :mod:`agcnn.explain` and below; never a command.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from agcnn.calibration import Calibration, CalibrationError
from agcnn.checkpoint import load_checkpoint, model_from_checkpoint, trained_branches
from agcnn.config import Config
from agcnn.errors import CheckpointError
from agcnn.explain import Explanation, cam_from_features, check_classes, explain, feature_maps
from agcnn.fileio import sha256_file
from agcnn.precision import inference_precision
from agcnn.runtime import resolve_device
from agcnn.stages import BRANCHES

__all__ = ["InferenceModel", "Scores", "explain_scores", "load_for_inference", "memory_format_of", "score"]


def memory_format_of(cfg: Config) -> torch.memory_format:
    """The memory format a checkpoint's model runs in (``train.channels_last``)."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


# ---------------------------------------------------------------------- scoring

@dataclass
class Scores:
    """One forward pass over a batch. Tensors stay on the model's device.

    ``logits``: ``{branch: [B, K] float32}`` of the branches the pass computed (``global`` only
    for ``stage="global"``). ``boxes`` [B, 4]: the attended boxes on the global input's grid
    (x1 / y1 exclusive); ``heatmap`` [B, h, w]: the attention heatmap (paper Eq. 3); both None
    for ``stage="global"``. ``explanation``: the maps of :func:`score`'s ``classes``, if asked.
    """

    logits: dict[str, Tensor]
    boxes: Tensor | None
    heatmap: Tensor | None
    output: Any  # the model's own output (agcnn.models.AGCNNOutput)
    input: Tensor  # the batch as the model saw it (on its device, in its memory format)
    precision: str
    features: dict[str, Tensor] | None = None  # the two last feature maps, when kept for CAMs
    explanation: Explanation | None = None
    pooled: dict[str, Tensor] = field(default_factory=dict)

    def probabilities(self, branch: str) -> Tensor:
        """Sigmoid probabilities ``[B, K]`` (float32, on the device): the model returns logits."""
        if branch not in self.logits:
            raise ValueError(f"the {branch} logits were not computed in this pass; computed: {sorted(self.logits)}")
        return torch.sigmoid(self.logits[branch])


def score(
    model: nn.Module,
    images: Tensor,
    *,
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.preserve_format,
    stage: str = "fusion",
    features: bool = False,
    classes: Tensor | Sequence[Sequence[int]] | None = None,
    method: str = "cam",
    branches: tuple[str, ...] = BRANCHES,
) -> Scores:
    """Score a normalised image batch ``[B, 3, S, S]`` with ``model`` (in eval mode) at ``precision``.

    The batch is moved to the model's device in ``memory_format``. ``stage``: ``fusion`` (all
    three branches, boxes, heatmap) or ``global`` (the global branch alone, for a stage-I
    checkpoint). ``features``: keep the two last feature maps, so that :func:`explain_scores`
    can draw CAMs later without a second pass. ``classes`` [B, k]: also the maps of these
    findings (``method`` ``cam`` or ``gradcam``; ``branches`` limits Grad-CAM's backward
    passes). No gradients are kept, except inside Grad-CAM.
    """
    device = _device_of(model)
    x = images.to(device, non_blocking=True, memory_format=memory_format)
    keep = features or (classes is not None and method == "cam")
    if keep and stage != "fusion":
        raise ValueError("maps need the fusion pass (stage='fusion'): the local branch and the boxes come from it")
    taps = feature_maps(model) if keep else contextlib.nullcontext({})
    with torch.no_grad(), taps as feats, inference_precision(precision, device):
        out = model(x, stage=stage)
    logits = {b: out.logits(b).float() for b in (("global",) if stage == "global" else BRANCHES)}
    pooled = {b: getattr(out, f"{b}_pooled").float() for b in ("global", "local") if getattr(out, f"{b}_pooled", None) is not None}
    heatmap = getattr(out, "heatmap", None)
    result = Scores(logits=logits, boxes=getattr(out, "boxes", None), heatmap=None if heatmap is None else heatmap.float(),
                    output=out, input=x, precision=precision, features=dict(feats) if keep else None, pooled=pooled)
    if classes is not None:
        result.explanation = explain_scores(model, result, classes, method=method, branches=branches)
    return result


def explain_scores(model: nn.Module, scores: Scores, classes: Tensor | Sequence[Sequence[int]], *, method: str = "cam",
                   branches: tuple[str, ...] = BRANCHES) -> Explanation:
    """The maps (:mod:`agcnn.explain`) of ``classes`` [B, k] for a batch already scored.

    CAM comes from the feature maps the pass kept (``score(..., features=True)``), so the maps
    belong to the boxes and logits of ``scores``; Grad-CAM repeats the forward pass with
    gradients, at the same precision, so its boxes are those of ``scores`` too.
    """
    x = scores.input
    classes = check_classes(classes, x.shape[0], model.num_classes, x.device)
    if method == "cam":
        if scores.features is None:
            raise ValueError("CAMs of a scored batch need its feature maps: score(..., features=True)")
        # The einsums run in float32 on the kept feature maps, whatever the pass's precision.
        return cam_from_features(model, scores.output, scores.features, classes)
    with inference_precision(scores.precision, x.device):
        return explain(model, x, classes, method=method, out=scores.output, branches=branches)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------- loading

@dataclass
class InferenceModel:
    """A checkpoint's model ready to score: on its device, in eval mode and its memory format.

    ``meta``: every value of the checkpoint but its weights (``stage``, ``operating_points``,
    ``split``, ...). ``branches``: the branches its training stage has trained; the others hold
    random weights.
    """

    model: nn.Module
    config: Config
    meta: dict[str, Any]
    path: Path
    sha256: str
    device: torch.device
    branches: tuple[str, ...]

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def stage(self) -> str | None:
        return self.meta.get("stage")

    @property
    def precision(self) -> str:
        """``train.inference_precision``: every score of this checkpoint is computed at it."""
        return self.config.train.inference_precision

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format_of(self.config)

    @property
    def forward_stage(self) -> str:
        """``global`` for a checkpoint that has trained only the global branch (no region step needed)."""
        return "global" if self.branches == ("global",) else "fusion"

    def operating_points(self, branch: str = "fusion") -> list[float | None] | None:
        """The stored operating points of ``branch`` (one per label), or None when there are none."""
        points = (self.meta.get("operating_points") or {}).get(branch)
        if points is not None and len(points) != len(self.labels):
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} has {len(points)} {branch} operating points for {len(self.labels)} labels; "
                f"re-run the operating-point selection"
            )
        return points

    @functools.cached_property
    def calibration(self) -> Calibration | None:
        """The checkpoint's calibration (``agcnn calibrate``), or None."""
        try:
            return Calibration.of(self.meta)
        except CalibrationError as e:
            raise CheckpointError(f"checkpoint {str(self.path)!r}: {e}") from None

    def probabilities(self, scored: Scores, branch: str) -> Tensor:
        """``[B, K]`` float32 probabilities of ``branch`` on the CPU: the sigmoid of the logits,
        then the checkpoint's calibration when it carries one -- what every output writes."""
        p = scored.probabilities(branch).float().cpu()
        if self.calibration is None:
            return p
        return torch.from_numpy(self.calibration.apply(p.numpy(), branch)).float()

    def score(self, images: Tensor, **kwargs: Any) -> Scores:
        """:func:`score` at this checkpoint's precision and memory format."""
        kwargs.setdefault("stage", self.forward_stage)
        return score(self.model, images, precision=self.precision, memory_format=self.memory_format, **kwargs)


def load_for_inference(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    need: str | None = None,
    command: str = "score",
    option: str = "--device",
) -> InferenceModel:
    """Load a checkpoint's model for inference on ``device`` (a torch device, or a name for
    :func:`agcnn.runtime.resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    ``need``: a branch the checkpoint must have trained (``fusion`` for ``predict``); ``command``
    names what the user was doing, for that error. Raises :class:`CheckpointError` for a
    missing, unreadable or foreign file, a label list or config it cannot check, a stage that
    has not trained ``need``, or weights that do not fit the stored config. The device is
    resolved after the checkpoint is checked (its error is a usage error of ``option``).
    """
    path = Path(path)
    try:
        ckpt = load_checkpoint(path)
        trained = trained_branches(ckpt)
    except CheckpointError:
        raise
    except ValueError as e:  # label list / config problems inside an agcnn checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None
    if need is not None and need not in trained:
        # Its head of ``need`` (and for stage I the local branch) still holds random weights.
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from the {ckpt.get('stage')} stage, whose {need} "
            f"{'head' if need == 'fusion' else 'branch'} is untrained; {command} with the fusion stage's checkpoint "
            f"(RUN_DIR/fusion/best.pt)"
        )
    dev = device if isinstance(device, torch.device) else resolve_device(str(device), option=option)
    try:
        model, cfg = model_from_checkpoint(ckpt)
    except Exception as e:  # noqa: BLE001 - weights that do not fit the stored config
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not rebuild a model ({type(e).__name__}: {e}); re-export it with `agcnn train`"
        ) from None
    model = model.eval().to(dev).to(memory_format=memory_format_of(cfg))
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return InferenceModel(model=model, config=cfg, meta=meta, path=path, sha256=sha256_file(path), device=dev,
                          branches=tuple(trained))
