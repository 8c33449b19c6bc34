"""Where does the attended box fall? The planted small opacities of the validation split.

For a phantom run (``agcnn demo`` or ``agcnn train`` on ``dataset: synthetic``), the checkpoint's
attended box (global heatmap, tau, largest region: what the local branch crops) is computed for
every validation film and compared with the planted small opacities: the share whose centre lies
inside the box, per kind (nodule, granuloma, vessel), split by whether the film also carries a
large finding that competes for the single box, and the mean box area. ``--heatmap cam`` measures
the class-activation heatmap on the same global branch (``model.heatmap``), without retraining.
The test split is not read, so this is what settings may be chosen on.

    python scripts/attention_on_val.py agcnn_demo/run/global/best.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agcnn.config import HEATMAPS
from agcnn.data.datasets import build_datasets
from agcnn.data.synthetic import FINDINGS
from agcnn.demo import attended_opacities, box_area, inside_counts
from agcnn.inference import load_for_inference


def attention_on_split(checkpoint: Path, split: str = "val", batch_size: int = 32, heatmap: str | None = None) -> dict:
    """``heatmap`` measures another ``model.heatmap`` on the same global branch (no retraining)."""
    loaded = load_for_inference(checkpoint, "cpu")
    cfg = loaded.config
    if cfg.data.dataset != "synthetic":
        raise SystemExit(f"{checkpoint} was trained on data.dataset={cfg.data.dataset!r}; this measures phantom runs only "
                         "(for boxes of real films use agcnn localize)")
    dataset = build_datasets(cfg, splits=(split,))[split]
    if heatmap is not None:
        loaded.model.heatmap_kind = heatmap
    ops, seen = attended_opacities(loaded, dataset, cfg, batch_size)
    table = dataset.table.reset_index(drop=True)
    large = [f for f in FINDINGS if f != "Nodule"]
    competing = table.loc[ops["row"], large].sum(axis=1).to_numpy() > 0
    return {
        "images": len(table),
        "box_area": box_area(seen["boxes"], cfg.data.image_size),
        "inside": inside_counts(ops),
        "inside_alone": inside_counts(ops[~competing]),
        "inside_with_large": inside_counts(ops[competing]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a stage's best.pt of a phantom run")
    parser.add_argument("--split", choices=("train", "val"), default="val", help="split to measure (default val; never test)")
    parser.add_argument("--heatmap", choices=HEATMAPS, help="attended region from this model.heatmap instead of the checkpoint's")
    args = parser.parse_args()
    r = attention_on_split(args.checkpoint, args.split, heatmap=args.heatmap)
    print(f"{args.split} split, {r['images']} films; attended box {100 * r['box_area']:.0f}% of the image on average")
    print(f"{'kind':<10} {'all':>12} {'film alone':>12} {'with large':>12}   (centre inside the attended box)")
    for kind, (i, n) in r["inside"].items():
        cells = [f"{i}/{n}"] + [f"{a}/{b}" for a, b in (r[k].get(kind, (0, 0)) for k in ("inside_alone", "inside_with_large"))]
        print(f"{kind:<10} " + " ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
