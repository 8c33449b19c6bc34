"""agcnn: attention-guided CNN (AG-CNN) for multi-label chest X-ray classification.

Guan et al., "Diagnose like a Radiologist: Attention Guided Convolutional Neural Network
for Thorax Disease Classification", arXiv:1801.09927.
"""

__version__ = "0.1.0"

from agcnn.labels import LABELS  # noqa: E402

__all__ = ["LABELS", "__version__"]
