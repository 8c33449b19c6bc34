"""Where a demo-like global branch's class activation maps lie, per finding, against the planted boxes.

Trains the demo's global branch (``agcnn/configs/demo.yaml``: ResNet-18 at half width, stride 16)
in memory on phantoms seen at 128 px -- AdamW with a cosine schedule, horizontal flips, no zoom --
then counts, on held-out phantoms, how often the largest region of each finding's CAM (above half
its maximum, as ``agcnn localize`` draws it) holds the centre of that finding's box. Besides the
CAM it scores the exact split of a max-pooled logit: each channel's weighted maximum placed where
that maximum was. docs/demo.md ("The Effusion maps") quotes its output::

    python scripts/cam_on_phantoms.py --pool max --epochs 20
    python scripts/cam_on_phantoms.py --pool avg --epochs 12

About 5-20 minutes on 2 CPU cores, most of it the training.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from agcnn.config import Config
from agcnn.data.synthetic import FINDINGS, make_phantom
from agcnn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from agcnn.demo import demo_config_path
from agcnn.explain import cam_boxes
from agcnn.labels import LABELS
from agcnn.models import AGCNN
from agcnn.models.roi import upsample_bilinear

SIZE, VIEW = 512, 128


def films(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``n`` phantoms as the global branch sees them (normalised, 128 px), their labels and boxes."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xs, ys, boxes = [], [], []
    for i in range(n):
        image, labels, b = make_phantom(np.random.default_rng([seed, i]), SIZE)
        x = torch.from_numpy(image.astype(np.float32) / 4095)[None, None]
        xs.append(F.interpolate(x, size=(VIEW, VIEW), mode="area")[0])
        ys.append([labels[k] for k in LABELS])
        boxes.append(b)
    x = (torch.stack(xs).repeat(1, 3, 1, 1) - mean) / std
    return x, torch.tensor(ys, dtype=torch.float32), boxes


def centre_hits(maps: torch.Tensor, gt: np.ndarray) -> int:
    """Boxes whose centre lies in the largest region of its map (feature grid -> image pixels)."""
    bx, _ = cam_boxes(upsample_bilinear(maps, VIEW), 0.5)
    bx = bx.numpy() * SIZE / VIEW
    cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
    return int(((bx[:, 0] <= cx) & (cx < bx[:, 2]) & (bx[:, 1] <= cy) & (cy < bx[:, 3])).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", choices=("max", "avg"), default="max")
    parser.add_argument("--count", type=int, default=600, help="training phantoms (default 600)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = Config.load(demo_config_path(), [f"model.pool={args.pool}"])
    model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=VIEW)
    t0 = time.perf_counter()
    x_train, y_train, _ = films(args.count, 11 + 100 * args.seed)
    x_test, y_test, b_test = films(150, 12 + 100 * args.seed)
    opt = torch.optim.AdamW(model.global_branch.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(args.count).split(16):
            x = x_train[idx]
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(model(x, stage="global").global_logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(x_test, stage="global").global_logits)
    print(f"pool {args.pool}, {args.count} phantoms, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s")
    for f in FINDINGS:
        k = LABELS.index(f)
        rows = [i for i, b in enumerate(b_test) if any(name == f for name, *_ in b)]
        gt = np.array([next(b[1:] for b in b_test[i] if b[0] == f) for i in rows], dtype=float)
        with torch.no_grad():
            fm = model.global_branch.forward_features(x_test[rows])
            w = model.global_branch.classifier.weight[k]
            cam = torch.einsum("c,bchw->bhw", w, fm)
            flat = fm.flatten(2)
            at = flat.argmax(2, keepdim=True)
            exact = torch.zeros_like(flat).scatter_(2, at, flat.gather(2, at) * w[None, :, None]).sum(1).view_as(cam)
        print(f"{f:<13} held-out AUC {roc_auc_score(y_test[:, k], p[:, k]):.3f}; box centre in the CAM's largest region "
              f"{centre_hits(cam, gt)} of {len(rows)}, in the max-pool split's {centre_hits(exact, gt)}")


if __name__ == "__main__":
    main()
