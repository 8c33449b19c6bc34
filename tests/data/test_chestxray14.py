from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from agcnn.data.chestxray14 import (
    load_chestxray14,
    patient_from_name,
    read_data_entry,
    read_labelled_list,
    read_name_list,
)
from agcnn.labels import LABELS

# CI clones the repository next to shared/; never an absolute path.
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
NIH_META = SHARED / "data" / "nih-metadata"
needs_nih_meta = pytest.mark.skipif(not (NIH_META / "Data_Entry_2017_v2020.csv.gz").is_file(),
                                    reason=f"real NIH metadata not found at {NIH_META} (shared/ beside the clone)")

HEADER_2020 = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
ROWS_2020 = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,80,M,AP,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia,0,3,74,F,PA,2500,2048,0.168,0.168",
    "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2048,2500,0.168,0.168",
    "00000005_000.png,No Finding,0,5,69,F,PA,2048,2500,0.168,0.168",
]


def write_entry(path: Path, *, old_style: bool = False) -> Path:
    # The 2017 file ends the header and every row with an extra comma.
    tail = "," if old_style else ""
    text = HEADER_2020.rstrip("\n") + tail + "\n" + "".join(r + tail + "\n" for r in ROWS_2020)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name,old_style", [("Data_Entry_2017.csv", True), ("Data_Entry_2017_v2020.csv.gz", False)])
def test_header_with_commas_is_parsed(tmp_path, name, old_style):
    table = read_data_entry(write_entry(tmp_path / name, old_style=old_style))
    assert list(table.columns[:7]) == ["image", "finding_labels", "follow_up", "patient", "age", "sex", "view"]
    assert list(table.columns[7:]) == list(LABELS)
    assert table["view"].tolist() == ["PA", "PA", "AP", "PA", "AP", "PA"]
    assert table["patient"].tolist() == ["1", "1", "2", "3", "4", "5"]
    assert table.loc[1, ["Cardiomegaly", "Emphysema"]].tolist() == [1.0, 1.0]
    assert table.loc[2, list(LABELS)].sum() == 0  # No Finding
    assert table.loc[4, ["Mass", "Nodule"]].tolist() == [1.0, 1.0]


def test_unknown_finding_is_an_error(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(HEADER_2020 + "00000001_000.png,Cardiomegally,0,1,57,M,PA,1,1,1,1\n")
    with pytest.raises(ValueError, match="Cardiomegally"):
        read_data_entry(path)


def test_name_list_without_final_newline(tmp_path):
    path = tmp_path / "test_list.txt"
    path.write_text("a.png\nb.png\n\nc.png")
    assert read_name_list(path) == ["a.png", "b.png", "c.png"]


def test_chexnet_list(tmp_path):
    path = tmp_path / "train_list.txt"
    path.write_text("00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n00000002_000.png 0 0 0 0 1 1 0 0 0 0 0 0 0 1")
    table = read_labelled_list(path)
    assert table["image"].tolist() == ["00000001_000.png", "00000002_000.png"]
    assert table.loc[0, "Cardiomegaly"] == 1 and table.loc[1, ["Mass", "Nodule", "Hernia"]].tolist() == [1, 1, 1]
    path.write_text("00000001_000.png 0 1 0\n")
    with pytest.raises(ValueError, match="has 3 labels, expected 14"):
        read_labelled_list(path)


def test_patient_from_name():
    assert patient_from_name("00000013_005.png") == "13"


def make_nih_folder(root: Path, *, nested: bool = False) -> Path:
    write_entry(root / "Data_Entry_2017_v2020.csv.gz")
    (root / "train_val_list.txt").write_text("\n".join(r.split(",")[0] for r in ROWS_2020[:4]))
    (root / "test_list.txt").write_text("\n".join(r.split(",")[0] for r in ROWS_2020[4:]))
    images = root / ("images_001/images" if nested else "images")
    images.mkdir(parents=True)
    for r in ROWS_2020:
        (images / r.split(",")[0]).write_bytes(b"")
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_load_official_split(tmp_path, nested):
    root = make_nih_folder(tmp_path, nested=nested)
    table = load_chestxray14(root, val_fraction=0.34, split_seed=0)
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.loc[table["split"] == "test", "image"].tolist() == ["00000004_000.png", "00000005_000.png"]
    # Patient 1's two images stay together.
    assert table.loc[table["patient"] == "1", "split"].nunique() == 1
    prefix = "images_001/images/" if nested else "images/"
    assert all(p.startswith(prefix) for p in table["path"])
    assert table[list(LABELS)].dtypes.unique().tolist() == [np.float32]


def test_views_filter_and_missing_images(tmp_path):
    root = make_nih_folder(tmp_path)
    table = load_chestxray14(root, views=["pa"])
    assert set(table["view"]) == {"PA"} and len(table) == 4
    (root / "images" / "00000005_000.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 ChestX-ray14 images"):
        load_chestxray14(root)


def test_a_patient_in_both_the_train_and_test_lists_is_an_error(tmp_path):
    root = make_nih_folder(tmp_path)
    # Patient 1's second image moves to the test list: patient 1 is then on both sides.
    (root / "train_val_list.txt").write_text("\n".join(r.split(",")[0] for r in ROWS_2020[:1] + ROWS_2020[2:4]))
    (root / "test_list.txt").write_text("\n".join(r.split(",")[0] for r in ROWS_2020[1:2] + ROWS_2020[4:]))
    with pytest.raises(ValueError, match=r"1 patients have images in both the training list and the validation/test list "
                                         r"\(e.g. patient '1'\); the split must be patient-wise"):
        load_chestxray14(root)


def test_chexnet_lists_with_own_labels(tmp_path):
    for split, names in {"train": ["00000001_000.png", "00000001_001.png"], "val": ["00000002_000.png"], "test": ["00000003_000.png"]}.items():
        (tmp_path / f"{split}_list.txt").write_text("".join(f"{n} " + " ".join(["0"] * 13 + ["1"]) + "\n" for n in names))
    table = load_chestxray14(tmp_path, train_list=tmp_path / "train_list.txt", val_list=tmp_path / "val_list.txt",
                             test_list=tmp_path / "test_list.txt", check_files=False)
    assert table["split"].tolist() == ["train", "train", "test", "val"]
    assert (table["Hernia"] == 1).all() and table["patient"].tolist()[:2] == ["1", "1"]


@needs_nih_meta
def test_real_official_split_is_patient_wise():
    table = load_chestxray14(NIH_META, metadata=NIH_META / "Data_Entry_2017_v2020.csv.gz", val_fraction=0.1, split_seed=0, check_files=False)
    assert len(table) == 112120
    assert (table["split"] == "test").sum() == 25596
    patients = {s: set(table.loc[table["split"] == s, "patient"]) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    # About a tenth of the train_val patients are validation.
    n_tv = len(patients["train"]) + len(patients["val"])
    assert abs(len(patients["val"]) / n_tv - 0.1) < 0.01
    # Every row has 0/1 labels; NIH's "No Finding" rows are all zero.
    assert table[list(LABELS)].isin([0.0, 1.0]).all().all()
    assert 55000 < (table[list(LABELS)].sum(axis=1) == 0).sum() < 65000


@needs_nih_meta
def test_real_chexnet_lists_parse():
    split = NIH_META / "chexnet-arnoweng-split"
    table = read_labelled_list(split / "val_list.txt")
    assert len(table) == 11219 and list(table.columns) == ["image", *LABELS]
