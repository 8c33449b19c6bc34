"""Models: backbones, attention blocks, the region step and AG-CNN itself."""

from agcnn.models.agcnn import AGCNN, AGCNNOutput, Branch
from agcnn.models.attention import ATTENTION_KINDS, create_attention, get_attention
from agcnn.models.backbones import BACKBONES, create_backbone

__all__ = ["AGCNN", "AGCNNOutput", "ATTENTION_KINDS", "BACKBONES", "Branch", "create_attention", "create_backbone", "get_attention"]
