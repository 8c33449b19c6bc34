from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agcnn.cli import main
from agcnn.data.synthetic import FINDINGS, ensure_phantoms, generate_phantoms, make_phantom
from agcnn.labels import LABELS


def test_make_phantom_is_deterministic():
    a = make_phantom(np.random.default_rng(7), 128)
    b = make_phantom(np.random.default_rng(7), 128)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    c = make_phantom(np.random.default_rng(8), 128)
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.uint16 and a[0].shape == (128, 128) and a[0].max() <= 4095


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_has_a_box_and_changes_the_image(finding):
    forced = {name: name == finding for name in FINDINGS}
    none = {name: False for name in FINDINGS}
    img, labels, boxes = make_phantom(np.random.default_rng(3), 256, findings=forced)
    ref, ref_labels, ref_boxes = make_phantom(np.random.default_rng(3), 256, findings=none)
    assert labels[finding] == 1 and sum(labels.values()) == 1 and set(labels) == set(LABELS)
    assert sum(ref_labels.values()) == 0 and ref_boxes == []
    assert {b[0] for b in boxes} == {finding}
    for _, x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        # The finding is inside its box: the image differs there from the finding-free twin.
        diff = np.abs(img.astype(float) - ref.astype(float))
        assert diff[y0:y1, x0:x1].mean() > 2 * diff.mean()


def test_nodule_is_small():
    img, labels, boxes = make_phantom(np.random.default_rng(0), 512, findings={n: n == "Nodule" for n in FINDINGS})
    for _, x0, y0, x1, y1 in boxes:
        # 1-1.8 % of the width: under 5 px at 224, 6-10 px at 512.
        assert 4 <= x1 - x0 <= 11


def test_prevalence():
    labels = [make_phantom(np.random.default_rng([1, i]), 64)[1] for i in range(300)]
    table = pd.DataFrame(labels)
    none = (table.sum(axis=1) == 0).mean()
    assert 0.28 < none < 0.48
    assert (table[[c for c in LABELS if c not in FINDINGS]] == 0).all().all()


def test_generate_phantoms(tmp_path):
    path = generate_phantoms(tmp_path / "a", count=16, size=96, seed=5, dicom_fraction=0.25)
    table = pd.read_csv(path)
    boxes = pd.read_csv(tmp_path / "a" / "boxes.csv")
    assert list(table.columns[:3]) == ["path", "patient", "split"] and list(table.columns[-14:]) == list(LABELS)
    assert len(table) == 16 and all((tmp_path / "a" / p).is_file() for p in table["path"])
    assert table["path"].str.endswith(".dcm").sum() == 4
    assert table.groupby("patient")["split"].nunique().max() == 1
    assert table["patient"].value_counts().max() <= 2
    # Labels agree with the boxes, image by image.
    for _, row in table.iterrows():
        planted = set(boxes.loc[boxes["path"] == row["path"], "label"])
        assert planted == {name for name in LABELS if row[name] == 1}
    # The same seed gives the same files.
    again = generate_phantoms(tmp_path / "b", count=16, size=96, seed=5, dicom_fraction=0.25)
    assert pd.read_csv(again).equals(table)
    first = table["path"][table["path"].str.endswith(".png")].iloc[0]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()


def test_phantoms_read_back(tmp_path):
    from agcnn.data.readers import read_image

    path = generate_phantoms(tmp_path, count=8, size=96, seed=2, dicom_fraction=0.5)
    table = pd.read_csv(path)
    images = {p: read_image(tmp_path / p) for p in table["path"]}
    for p, img in images.items():
        assert img.shape == (96, 96) and 0 <= img.min() and img.max() <= 1
        # Bright = dense for every format, MONOCHROME1 included: the mediastinum (centre column)
        # is brighter than the lungs on either side.
        mid, lung = img[30:60, 44:52].mean(), img[30:60, 20:28].mean()
        assert mid > lung, p


def test_ensure_phantoms(tmp_path):
    first = ensure_phantoms(tmp_path, count=6, size=64, seed=0)
    mtime = first.stat().st_mtime_ns
    assert ensure_phantoms(tmp_path, count=6, size=64, seed=0).stat().st_mtime_ns == mtime
    ensure_phantoms(tmp_path, count=4, size=64, seed=0)
    assert len(pd.read_csv(first)) == 4 and len(list((tmp_path / "images").iterdir())) == 4
    (tmp_path / "phantoms.json").unlink()
    with pytest.raises(ValueError, match="not a phantom set"):
        ensure_phantoms(tmp_path, count=4, size=64, seed=0)


def test_cli(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path), "--count", "5", "--size", "64", "--seed", "1"]) == 0
    assert "wrote 5 phantoms" in capsys.readouterr().out
    assert (tmp_path / "labels.csv").is_file() and (tmp_path / "boxes.csv").is_file()
