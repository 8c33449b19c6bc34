"""Can a small opacity's kind be learned at 512 px, and at 128 px? A measurement of the phantoms.

For every planted small opacity of a phantom set (``agcnn phantoms`` or an ``agcnn demo``
folder's ``phantoms/``), a patch around it is cut from the 512 px film (40 x 40 px) and from the
same film downsampled to 128 px as the global branch sees it (10 x 10 px). A small CNN is
trained on the training split's patches to tell a nodule from a look-alike and scored (ROC AUC)
on the validation split's. The test split is not read.

    python scripts/probe_phantoms.py agcnn_demo/phantoms
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from agcnn.data.readers import read_image


def patches(root: Path, global_size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    table = pd.read_csv(root / "labels.csv")
    nodules = pd.read_csv(root / "boxes.csv").query("label == 'Nodule'").rename(columns={"label": "kind"})
    ops = pd.concat([nodules, pd.read_csv(root / "lookalikes.csv")]).merge(table[["path", "split"]], on="path")
    ops = ops[ops["split"] != "test"]
    hi, lo = [], []
    for r in ops.itertuples():
        img = read_image(root / r.path).astype(np.float32)
        f = img.shape[0] // global_size
        cx, cy = int((r.x0 + r.x1) / 2), int((r.y0 + r.y1) / 2)
        p = np.pad(img, 24, mode="edge")
        hi.append(p[cy + 4 : cy + 44, cx + 4 : cx + 44])
        small = F.interpolate(torch.from_numpy(img)[None, None], size=(global_size, global_size), mode="bilinear",
                              antialias=True, align_corners=False)[0, 0].numpy()
        q = np.pad(small, 8, mode="edge")
        sx, sy = int(round(cx / f)), int(round(cy / f))
        lo.append(q[sy + 3 : sy + 13, sx + 3 : sx + 13])
    return hi, lo, (ops["kind"] == "Nodule").to_numpy(np.float32), ops["split"].to_numpy()


def probe(x: list[np.ndarray], y: np.ndarray, split: np.ndarray, epochs: int = 60, seed: int = 0) -> tuple[float, float]:
    """Train AUC and validation AUC of a small CNN (rotation and flip augmentation)."""
    torch.manual_seed(seed)
    X = torch.from_numpy(np.stack(x))[:, None]
    X = (X - X.mean()) / X.std()
    tr, va = split == "train", split == "val"
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = X[tr], torch.from_numpy(y[tr])
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 32):
            xb = torch.rot90(xt[order[i : i + 32]], int(torch.randint(4, (1,))), (2, 3))
            if torch.rand(1) < 0.5:
                xb = xb.flip(3)
            loss = F.binary_cross_entropy_with_logits(net(xb)[:, 0], yt[order[i : i + 32]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return roc_auc_score(y[tr], net(xt)[:, 0].numpy()), roc_auc_score(y[va], net(X[va])[:, 0].numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="phantom folder (labels.csv, boxes.csv, lookalikes.csv, images/)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hi, lo, y, split = patches(args.root)
    for name, x in (("512 px, 40 x 40 patch", hi), ("128 px, 10 x 10 patch", lo)):
        auc_train, auc_val = probe(x, y, split)
        print(f"{name}: nodule vs look-alike AUC train {auc_train:.3f}, validation {auc_val:.3f} "
              f"({int((split == 'train').sum())} / {int((split == 'val').sum())} opacities)")


if __name__ == "__main__":
    main()
