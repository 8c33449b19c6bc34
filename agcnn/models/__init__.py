"""Models: backbones, attention blocks, the region step and AG-CNN itself."""

from agcnn.models.agcnn import AGCNN, AGCNNOutput, Branch
from agcnn.models.attention import create_attention, get_attention
from agcnn.models.backbones import create_backbone

# The menus of names (ATTENTION_KINDS, BACKBONES) live in agcnn.config with the others.
__all__ = ["AGCNN", "AGCNNOutput", "Branch", "create_attention", "create_backbone", "get_attention"]
