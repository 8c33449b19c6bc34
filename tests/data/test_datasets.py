from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.config import Config
from agcnn.data.datasets import ImageLoadError, XrayDataset, build_datasets, load_dataframe
from agcnn.labels import LABELS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
NIH_SAMPLE = SHARED / "data" / "nih-cxr14-sample"


def small_cfg(**data) -> Config:
    raw = {"data": {"resize": 64, "image_size": 56, "highres_size": 56, **data}}
    return Config.from_dict(raw)


def write_pngs(folder: Path, n: int, size: int = 80) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        img = np.full((size, size), 20 * i % 255, np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), img)
        names.append(f"{i}.png")
    return names


def test_synthetic_datasets(tmp_path):
    cfg = small_cfg(dataset="synthetic", root=str(tmp_path / "ph"), synthetic_count=20, synthetic_size=96, highres_size=112)
    sets = build_datasets(cfg)
    assert set(sets) == {"train", "val", "test"}
    assert sum(len(s) for s in sets.values()) == 20
    patients = [set(s.table["patient"]) for s in sets.values()]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    item = sets["train"][0]
    assert set(item) == {"image", "labels", "index"}
    assert item["image"].shape == (3, 112, 112) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (14,) and item["index"] == 0
    assert sets["train"].transform is not sets["val"].transform
    batch = next(iter(torch.utils.data.DataLoader(sets["val"], batch_size=2)))
    assert batch["image"].shape == (2, 3, 112, 112) and batch["labels"].shape == (2, 14)


def test_csv_dataset_keeps_missing_labels(tmp_path):
    names = write_pngs(tmp_path / "img", 6)
    rows = ["path,patient,split,Effusion,Nodule"] + [f"img/{n},p{i},{'train' if i < 4 else 'test'},{['1', '', '-1'][i % 3]},0" for i, n in enumerate(names)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    cfg = small_cfg(dataset="csv", root=str(tmp_path), metadata=str(tmp_path / "t.csv"), val_fraction=0.0)
    cfg.labels = ["Effusion", "Nodule"]
    sets = build_datasets(cfg, splits=("train", "test"))
    labels = torch.stack([sets["train"][i]["labels"] for i in range(4)])
    assert labels[0].tolist() == [1.0, 0.0]
    assert torch.isnan(labels[1, 0]) and torch.isnan(labels[2, 0]) and labels[3, 0] == 1


def test_bad_image_names_the_file(tmp_path):
    write_pngs(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    table = pd.DataFrame({"path": ["0.png", "broken.png", "gone.png"], "Nodule": [0.0, 1.0, 0.0]})
    ds = XrayDataset(table, ["Nodule"], root=tmp_path, name="train")
    assert ds[0]["image"].shape == (1, 80, 80)
    for i, name in ((1, "broken.png"), (2, "gone.png")):
        with pytest.raises(ImageLoadError, match=f"'{name}' \\(row {i} of the train set"):
            ds[i]


def test_label_names_are_checked(tmp_path):
    cfg = small_cfg(dataset="chestxray14", root=str(tmp_path))
    cfg.labels = ["Effusion", "Nodle"]
    with pytest.raises(ValueError, match="did you mean 'Nodule'"):
        load_dataframe(cfg)
    with pytest.raises(ValueError, match="data.dataset='xray14' is not a valid choice"):
        small_cfg(dataset="xray14", root=str(tmp_path))
    cfg = small_cfg(dataset="csv", root=str(tmp_path))
    cfg.data.dataset = "xray14"  # changed after the config was checked
    with pytest.raises(ValueError, match="data.dataset='xray14' is not known"):
        load_dataframe(cfg)
    with pytest.raises(ValueError, match="unknown splits"):
        build_datasets(cfg, splits=("training",))


@pytest.mark.skipif(not (NIH_SAMPLE / "labels.csv").is_file(), reason=f"NIH sample images not found at {NIH_SAMPLE} (shared/ beside the clone)")
def test_real_sample(tmp_path):
    cfg = Config.from_dict({"data": {
        "dataset": "csv", "root": str(NIH_SAMPLE / "images"), "metadata": str(NIH_SAMPLE / "labels.csv"),
        "path_column": "image", "patient_column": "Patient ID", "views": ["PA"], "highres_size": 448,
    }})
    table = load_dataframe(cfg)
    assert len(table) == 518 and table[list(LABELS)].notna().all().all()
    sets = build_datasets(cfg, table=table)
    for split, ds in sets.items():
        item = ds[0]
        assert item["image"].shape == (3, 448, 448)
        expected = table[table["split"] == split].iloc[0][list(LABELS)].to_numpy(np.float32)
        assert np.array_equal(item["labels"].numpy(), expected)
    # A real radiograph: the normalised image is not flat.
    assert sets["test"][1]["image"].std() > 0.3
