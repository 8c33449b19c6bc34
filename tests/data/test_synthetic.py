from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agcnn.cli import main
from agcnn.data.synthetic import FINDINGS, OPACITY_KINDS, _small_opacity, ensure_phantoms, generate_phantoms, make_phantom
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
    assert [b[0] for b in boxes] == ["Nodule"]
    for _, x0, y0, x1, y1 in boxes:
        # Diameter 3.2-4.8 % of the width: 16-25 px at 512, 4-6 px at 128.
        assert 16 <= x1 - x0 <= 26


def _render(kind, r, seed, size=512):
    """One small opacity on a flat background, with the detector blur of make_phantom."""
    import cv2

    d = np.full((size, size), 0.2, np.float32)
    _small_opacity(d, size // 2, size // 2, r, 0.12, kind, np.random.default_rng(seed))
    return cv2.GaussianBlur(d, (0, 0), 0.6 * size / 512)


def _downsample(img, side):
    """What the global branch sees: agcnn.models.AGCNN.global_input's antialiased resize."""
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(img)[None, None], size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("r", [8.2, 10.2, 12.3])  # OPACITY_RADIUS at 512 px: both ends and the middle
def test_lookalikes_differ_from_nodules_only_in_detail_lost_at_128_px(r):
    """Identifiable at 512 px, not at 128 px: the kinds differ by a fifth of the opacity's contrast
    or more at full size, and by under 3 % of it after the 4x downsampling of the global branch."""
    vessel = _render("vessel", r, 0)
    vessel_low = _downsample(vessel, 128)
    peak, peak_low = vessel.max() - 0.2, vessel_low.max() - 0.2
    assert peak_low > 0.75 * peak  # detectable: most of the contrast survives downsampling
    for kind in ("nodule", "granuloma"):
        for seed in range(3):
            img = _render(kind, r, seed)
            assert np.abs(img - vessel).max() > 0.2 * peak
            assert np.abs(_downsample(img, 128) - vessel_low).max() < 0.03 * peak_low
            # Same integrated density: no brightness difference survives at any size.
            assert abs(img.sum() - vessel.sum()) < 1e-3 * (vessel - 0.2).sum()


def test_nodule_label_is_not_readable_from_global_image_statistics():
    """Films with a nodule and films with a look-alike have the same grey-level statistics at the
    global size: a classifier on them scores at chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    only = {n: n == "Nodule" for n in FINDINGS}
    none = {n: False for n in FINDINGS}
    feats, y = [], []
    for i in range(40):
        for kind in ("nodule", "granuloma", "vessel"):
            findings, look = (only, None) if kind == "nodule" else (none, kind)
            img = make_phantom(np.random.default_rng([9, i]), 256, findings=findings, lookalike=look)[0].astype(np.float32) / 4095
            low = _downsample(img, 64)
            feats.append([low.mean(), low.std(), *np.percentile(low, [1, 5, 25, 50, 75, 95, 99]), np.abs(np.diff(low, axis=1)).mean()])
            y.append(kind == "nodule")
    auc = cross_val_score(LogisticRegression(max_iter=2000), np.array(feats), np.array(y), cv=5, scoring="roc_auc").mean()
    assert auc < 0.7


def test_one_small_opacity_per_film_and_common_lookalikes():
    drawn = [make_phantom(np.random.default_rng([2, i]), 64) for i in range(400)]
    kinds = [[b[0] for b in boxes if b[0] in ("Nodule", *OPACITY_KINDS)] for _, _, boxes in drawn]
    assert all(len(k) <= 1 for k in kinds)
    share = {k: np.mean([k in ks for ks in kinds]) for k in ("Nodule", "granuloma", "vessel")}
    assert 0.42 < share["Nodule"] < 0.58 and 0.09 < share["granuloma"] < 0.21 and 0.09 < share["vessel"] < 0.21
    with pytest.raises(ValueError, match="lookalike"):
        make_phantom(np.random.default_rng(0), 64, findings={n: n == "Nodule" for n in FINDINGS}, lookalike="vessel")


def test_prevalence():
    labels = [make_phantom(np.random.default_rng([1, i]), 64)[1] for i in range(300)]
    table = pd.DataFrame(labels)
    none = (table.sum(axis=1) == 0).mean()
    assert 0.18 < none < 0.32
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
    # Labels agree with the boxes, image by image; look-alikes are listed apart, on films without a nodule.
    look = pd.read_csv(tmp_path / "a" / "lookalikes.csv")
    assert set(look["kind"]) <= {"granuloma", "vessel"}
    for _, row in table.iterrows():
        planted = set(boxes.loc[boxes["path"] == row["path"], "label"])
        assert planted == {name for name in LABELS if row[name] == 1}
        assert not (row["Nodule"] == 1 and (look["path"] == row["path"]).any())
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
