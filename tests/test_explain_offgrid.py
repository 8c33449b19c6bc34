"""Class activation maps land where the evidence is, also for evidence off the feature grid.

The backbone is replaced by one whose every channel is the image brightness averaged over
8 x 8 cells (as in ``tests/test_localize.py``), so each branch's CAM is the brightness seen at
the feature grid's resolution, brought back to input pixels. The planted boxes start and end
inside cells, not on their edges: a map that is upsampled with the wrong pixel centres
(``align_corners=True``: up to 1.7 px off here) or pasted back half a cell off moves its centre
of mass away from the box's, which a grid-aligned block (``tests/test_explain.py``) cannot show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agcnn.explain import cam_boxes, explain
from agcnn.models import AGCNN

SIZE = 64
# (x0, y0, x1, y1), exclusive ends; none of the edges is a multiple of the stride 8.
BOXES = [(13, 21, 37, 45), (41, 5, 57, 19), (3, 43, 21, 61), (27, 29, 34, 36)]


class Brightness(nn.Module):
    num_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :1] * 0.229 + 0.485).clamp(0, 1)
        return F.avg_pool2d(bright, 8).expand(-1, self.num_features, -1, -1).contiguous()


@pytest.fixture(scope="module")
def model() -> AGCNN:
    torch.manual_seed(0)
    m = AGCNN(14, backbone="resnet18", pool="avg", image_size=SIZE, local_size=SIZE, threshold=0.5)
    m.global_branch.features = Brightness()
    m.local_branch.features = Brightness()
    with torch.no_grad():
        for lin in (m.global_branch.classifier, m.local_branch.classifier, m.fusion):
            lin.weight.fill_(1.0 / lin.in_features)
            lin.bias.zero_()
    return m.eval()


def planted(box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    x0, y0, x1, y1 = box
    img = torch.zeros(SIZE, SIZE)
    img[y0:y1, x0:x1] = 1.0
    return ((img - 0.485) / 0.229)[None, None].expand(1, 3, SIZE, SIZE).clone(), img


def centre_of_mass(m: torch.Tensor) -> torch.Tensor:
    """(x, y) of a map's positive mass, in pixel coordinates whose pixel centres are at +0.5."""
    m = m.clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    return torch.stack([(m * xs).sum(), (m * ys).sum()]) / m.sum()


@pytest.mark.parametrize("box", BOXES)
def test_each_branch_cam_is_centred_on_evidence_off_the_feature_grid(model, box):
    x, img = planted(box)
    maps = explain(model, x).maps
    want = centre_of_mass(img)
    # The global map is the pooled brightness upsampled: its centre stays within a quarter pixel.
    assert (centre_of_mass(maps["global"][0, 0]) - want).abs().max() < 0.5
    # The local map is read on the attended crop and pasted back (the crop's box is whole
    # pixels); the fusion map adds the two.
    for branch in ("local", "fusion"):
        assert (centre_of_mass(maps[branch][0, 0]) - want).abs().max() < 1.0, branch


@pytest.mark.parametrize("box", BOXES[:2])
def test_the_global_cam_box_recovers_an_off_grid_box_to_a_pixel(model, box):
    x, _ = planted(box)
    found = cam_boxes(explain(model, x).maps["global"][0, :1][None])[0][0, 0]
    assert (found - torch.tensor(box)).abs().max() <= 1
