"""Every phantom finding's evidence lies where it is drawn, inside the box boxes.csv gives it.

A phantom can be rendered twice with every random draw the same, once without a finding
(``make_phantom(omit=...)``): the region the finding occupies then holds normal tissue. A model
that reads a finding from somewhere else -- a shifted diaphragm, the film's overall exposure --
would be right for a reason no radiograph has, and its class activation maps would point there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agcnn.data.synthetic import FINDINGS, PREVALENCE, make_phantom

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_and_without(finding: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """A film with ``finding`` alone, the same film without it, and the finding's box."""
    forced = {n: n == finding for n in FINDINGS}
    image, labels, boxes = make_phantom(np.random.default_rng([seed, 1]), size, findings=forced)
    normal, normal_labels, normal_boxes = make_phantom(np.random.default_rng([seed, 1]), size, findings=forced, omit=(finding,))
    assert labels[finding] == 1 and normal_labels[finding] == 0 and not normal_boxes
    box = next(b[1:] for b in boxes if b[0] == finding)
    return image, normal, box


def _replace_box(image: np.ndarray, normal: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = image.copy()
    out[y0:y1, x0:x1] = normal[y0:y1, x0:x1]
    return out


@pytest.mark.parametrize("finding", FINDINGS)
def test_what_a_finding_changes_lies_in_its_box(finding):
    """Pixel by pixel: the film with the finding minus the same film without it is (almost) zero
    outside the box grown by 4 % of the film -- the soft edges of the shapes -- and exactly zero
    in the far field (format 3 scaled every film by its own brightest pixels, which an enlarged
    heart moved: a Cardiomegaly cue all over the film)."""
    size = 256
    pad = int(0.04 * size)
    for seed in range(6):
        image, normal, (x0, y0, x1, y1) = _with_and_without(finding, seed, size)
        change = np.abs(image.astype(np.float64) - normal)
        near = np.zeros(change.shape, bool)
        near[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
        assert change[near].sum() >= 0.97 * change.sum(), (finding, seed)
        assert np.median(change[~near]) == 0, (finding, seed)


class _Tiny(nn.Module):
    """A small CNN with global max pooling: where it reads a finding is up to what it learns."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                                      *block(64, 64))
        self.head = nn.Linear(64, len(FINDINGS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.45) / 0.25).amax(dim=(2, 3)))


def _batch(images: list[np.ndarray], side: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 4095)[:, None]
    return F.interpolate(x, size=(side, side), mode="area")


@pytest.mark.slow
def test_a_classifier_loses_its_call_when_the_box_alone_holds_normal_tissue():
    """Trained on ordinary phantoms (128 px films seen at 64 px, findings at their prevalence;
    no look-alikes, which only a full-resolution view tells from a nodule), a small CNN calls
    each finding on most films that carry it, and loses nearly every such call when only the
    finding's box is replaced by the same film's normal tissue."""
    torch.manual_seed(0)
    size, side = 128, 64
    images, targets = [], []
    for i in range(1000):
        rng = np.random.default_rng([101, i])
        drawn = {n: bool(rng.random() < PREVALENCE[n]) for n in FINDINGS}
        image, labels, _ = make_phantom(rng, size, findings=drawn)
        images.append(image)
        targets.append([labels[n] for n in FINDINGS])
    x, y = _batch(images, side), torch.tensor(targets, dtype=torch.float32)
    model = _Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(8):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for k, finding in enumerate(FINDINGS):
        films = [_with_and_without(finding, 1000 + s, size) for s in range(24)]
        with torch.no_grad():
            p = torch.sigmoid(model(_batch([f[0] for f in films], side)))[:, k]
            p_normal_box = torch.sigmoid(model(_batch([_replace_box(*f) for f in films], side)))[:, k]
        called = p >= 0.3
        assert called.sum() >= 12, (finding, p)
        kept = called & (p_normal_box >= 0.3)
        assert kept.sum() <= 0.1 * called.sum(), (finding, p[called], p_normal_box[called])
