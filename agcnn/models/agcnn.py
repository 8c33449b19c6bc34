"""AG-CNN: global branch, attention-guided local branch, fusion head (Guan et al., Sec. 3).

The model returns logits; a sigmoid is applied only when reporting. Training uses
``BCEWithLogitsLoss`` on whichever logits the stage scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agcnn.config import HEATMAPS, POOLS, ModelConfig, check_choice
from agcnn.models.backbones import create_backbone, load_pretrained, start_weights_file
from agcnn.models.roi import attention_heatmap, boxes_from_heatmap, class_activation_heatmap, crop_regions, uncertainty_heatmap
from agcnn.stages import STAGES

log = logging.getLogger(__name__)



class Branch(nn.Module):
    """Backbone -> pool5 -> linear classifier; ``forward_features`` and ``forward_head`` apart."""

    def __init__(self, backbone: str, attention: str, pool: str, num_classes: int, dropout: float = 0.0, width: int = 64,
                 output_stride: int = 32) -> None:
        super().__init__()
        self.features = create_backbone(backbone, attention, width, output_stride)
        self.num_features: int = self.features.num_features
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def pool_features(self, fmap: Tensor) -> Tensor:
        # Pool5 is global max pooling in the paper (Sec. 3.1), average as an option.
        return fmap.amax(dim=(2, 3)) if self.pool == "max" else fmap.mean(dim=(2, 3))

    def forward_head(self, pooled: Tensor) -> Tensor:
        return self.classifier(self.dropout(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.pool_features(self.forward_features(x)))


@dataclass
class AGCNNOutput:
    global_logits: Tensor
    local_logits: Tensor | None = None
    fusion_logits: Tensor | None = None
    # Attention boxes (x0, y0, x1, y1) in global-input pixels, x1/y1 exclusive.
    boxes: Tensor | None = None
    # Normalised heatmap on the global feature grid [B, h, w].
    heatmap: Tensor | None = None
    global_pooled: Tensor | None = None
    local_pooled: Tensor | None = None
    # With model.no_finding: each branch's "No Finding" logit [B], kept apart from the findings'.
    no_finding: dict[str, Tensor] | None = None

    def logits(self, branch: str, *, with_no_finding: bool = False) -> Tensor:
        """The branch's logits of the findings [B, K]; ``with_no_finding`` appends the "No
        Finding" logit as column K when the model has one (the training target of the paper)."""
        out = {"global": self.global_logits, "local": self.local_logits, "fusion": self.fusion_logits}[branch]
        if out is None:
            raise ValueError(f"the {branch} logits were not computed in this forward pass")
        if with_no_finding and self.no_finding is not None:
            out = torch.cat([out, self.no_finding[branch][:, None]], dim=1)
        return out


class AGCNN(nn.Module):
    """Attention-guided CNN.

    ``forward(x)`` takes the normalised image batch [B, 3, S, S]. When ``S`` equals
    ``image_size`` both branches see the same image (the paper); when ``S`` is larger, the
    global branch sees it downsampled to ``image_size`` and the local branch crops the attended
    box from the full-resolution tensor, so it can see detail the global branch could not.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        attention: str = "none",
        pool: str = "max",
        threshold: float = 0.7,
        image_size: int = 224,
        local_size: int = 224,
        dropout: float = 0.0,
        width: int = 64,
        no_finding: bool = False,
        heatmap: str = "channels",
        global_stride: int = 32,
    ) -> None:
        super().__init__()
        check_choice("pool", pool, POOLS)
        check_choice("heatmap", heatmap, HEATMAPS)
        self.heatmap_kind = heatmap
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"model.threshold must be in [0, 1), got {threshold}; the paper uses 0.7")
        if image_size < 32 or local_size < 32:
            raise ValueError(f"image_size ({image_size}) and local_size ({local_size}) must be at least 32 pixels")
        self.num_classes, self.threshold = num_classes, threshold
        self.image_size, self.local_size = image_size, local_size
        # num_classes counts the findings; the paper's "No Finding" output (model.no_finding) is
        # one more row of every classifier, after them, so rows 0..K-1 stay the label list.
        self.no_finding = no_finding
        outputs = num_classes + int(no_finding)
        # Same architecture, no weight sharing (Sec. 3.3).
        self.global_branch = Branch(backbone, attention, pool, outputs, dropout, width, global_stride)
        self.local_branch = Branch(backbone, attention, pool, outputs, dropout, width)
        self.fusion_dropout = nn.Dropout(dropout)
        self.fusion = nn.Linear(self.global_branch.num_features + self.local_branch.num_features, outputs)

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int, image_size: int) -> "AGCNN":
        model = cls(
            num_classes,
            backbone=cfg.backbone,
            attention=cfg.attention,
            pool=cfg.pool,
            threshold=cfg.threshold,
            image_size=image_size,
            local_size=cfg.local_size,
            dropout=cfg.dropout,
            width=cfg.width,
            no_finding=cfg.no_finding,
            heatmap=cfg.heatmap,
            global_stride=cfg.global_stride,
        )
        path = start_weights_file(cfg)
        if path is not None:
            for name, branch in (("global", model.global_branch), ("local", model.local_branch)):
                info = load_pretrained(branch.features, path)
                log.info(
                    "%s branch: ImageNet weights from %s (sha256 %s); dropped %s; new (random) keys: %d",
                    name, path, info["sha256"][0], info["dropped"], len(info["missing"]),
                )
        return model

    def global_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] == self.image_size and x.shape[-2] == self.image_size:
            return x
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)

    def forward(self, x: Tensor, stage: str = "fusion") -> AGCNNOutput:
        """``stage``: ``global`` computes the global branch only; ``local`` and ``fusion`` all three."""
        check_choice("stage", stage, tuple(STAGES))
        if stage == "global":
            return self._split_no_finding(self._global(x)[1])
        out, crops = self.attend(x)
        l_map = self.local_branch.forward_features(crops)
        out.local_pooled = self.local_branch.pool_features(l_map)
        out.local_logits = self.local_branch.forward_head(out.local_pooled)
        out.fusion_logits = self.fuse(out.global_pooled, out.local_pooled)
        return self._split_no_finding(out)

    def attend(self, x: Tensor) -> tuple[AGCNNOutput, Tensor]:
        """The global branch, its heatmap and attended box, and the box cropped from ``x`` at
        ``local_size`` [B, 3, L, L]: the local branch's input (Sec. 3.2).

        The output's logits still carry the "No Finding" column when the model has one;
        :meth:`forward` moves it out.
        """
        g_map, out = self._global(x)
        # The findings' rows of the global classifier (not the "No Finding" output).
        findings_weight = self.global_branch.classifier.weight[: self.num_classes]
        if self.heatmap_kind == "cam":
            out.heatmap = class_activation_heatmap(g_map, findings_weight)
        elif self.heatmap_kind == "uncertain":
            out.heatmap = uncertainty_heatmap(g_map, findings_weight, self.findings(out.global_logits))
        else:
            out.heatmap = attention_heatmap(g_map)
        out.boxes = boxes_from_heatmap(out.heatmap, self.image_size, self.threshold)
        crops = crop_regions(x, out.boxes, self.image_size, self.local_size)
        if x.is_contiguous(memory_format=torch.channels_last):
            crops = crops.contiguous(memory_format=torch.channels_last)
        return out, crops

    def _global(self, x: Tensor) -> tuple[Tensor, AGCNNOutput]:
        """The global branch's last feature map and its output."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, S, S] image batch, got shape {tuple(x.shape)}")
        g_map = self.global_branch.forward_features(self.global_input(x))
        g_pooled = self.global_branch.pool_features(g_map)
        return g_map, AGCNNOutput(global_logits=self.global_branch.forward_head(g_pooled), global_pooled=g_pooled)

    def findings(self, logits: Tensor) -> Tensor:
        """The findings' columns of a classifier's output (without the "No Finding" one)."""
        return logits[:, : self.num_classes]

    def _split_no_finding(self, out: AGCNNOutput) -> AGCNNOutput:
        """Move the "No Finding" column out of the logits, so ``global_logits`` & co. always hold
        exactly the label list's findings (what evaluate, predict and their files use)."""
        if not self.no_finding:
            return out
        out.no_finding = {}
        for b in ("global", "local", "fusion"):
            full = getattr(out, f"{b}_logits")
            if full is not None:
                setattr(out, f"{b}_logits", full[:, : self.num_classes])
                out.no_finding[b] = full[:, self.num_classes]
        return out

    @torch.no_grad()
    def init_local_from_global(self) -> None:
        """Start the local branch as a copy of the trained global branch. Without ImageNet
        weights a local branch from random weights must learn from a few thousand crops what
        the global branch has already learned from the whole images -- what an opacity, an
        edge, a rib looks like -- before it can learn the detail only the crop shows. The
        branches keep their own weights from here on (Sec. 3.3: no weight sharing); the
        global branch's ``global_stride`` is a stride, not a weight, so the copy fits either way.
        """
        self.local_branch.load_state_dict(self.global_branch.state_dict())

    @torch.no_grad()
    def init_fusion_from_global(self) -> None:
        """Start the fusion head as a copy of the global classifier, with zero weight on the
        local features: at step 0 the fusion logits equal the global logits, so stage III can
        only move away from what the global branch knows where the local features help.
        The paper does not say how the fusion layer starts; a random start must first relearn
        the global classifier from the (small) training set before it can add anything.
        """
        n_global = self.global_branch.num_features
        self.fusion.weight.zero_()
        self.fusion.weight[:, :n_global].copy_(self.global_branch.classifier.weight)
        self.fusion.bias.copy_(self.global_branch.classifier.bias)

    def fuse(self, global_pooled: Tensor, local_pooled: Tensor) -> Tensor:
        """Fusion head on the concatenated pool5 features (Sec. 3.4): every output, "No Finding"
        included (:meth:`findings` keeps the label list's columns)."""
        return self.fusion(self.fusion_dropout(torch.cat([global_pooled, local_pooled], dim=1)))
