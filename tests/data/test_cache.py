from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.cli import main
from agcnn.config import Config
from agcnn.data.cache import CacheMismatchError, ImageCache, build_cache, decode_resized
from agcnn.data.datasets import ImageLoadError, XrayDataset, build_datasets


def write_images(folder: Path, n: int, size: int = 100) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 256, (size, size + 10 * (i % 2)), dtype=np.uint8))
        names.append(f"{i:02d}.png")
    return names


def test_round_trip(tmp_path):
    names = write_images(tmp_path / "img", 5)
    report = build_cache(tmp_path / "cache", names, tmp_path / "img", size=32, workers=0)
    assert report.complete and report.decoded == 5 and not report.unusable
    cache = ImageCache(tmp_path / "cache")
    rows = cache.verify(names[::-1], tmp_path / "img", size=32)
    assert rows.tolist() == [4, 3, 2, 1, 0]
    for i, name in enumerate(names):
        expected = decode_resized(tmp_path / "img" / name, 32) / 255.0
        np.testing.assert_allclose(cache.read(i), expected, atol=1e-6)
    # uint16 keeps finer levels.
    build_cache(tmp_path / "c16", names, tmp_path / "img", size=32, dtype="uint16", workers=0)
    assert np.load(tmp_path / "c16" / "images.npy", mmap_mode="r").dtype == np.uint16
    # An up-to-date cache is reused untouched.
    again = build_cache(tmp_path / "cache", names, tmp_path / "img", size=32, workers=0)
    assert again.complete and again.decoded == 0 and again.reused == 5


def test_resume_after_kill(tmp_path):
    names = write_images(tmp_path / "img", 7)
    first = build_cache(tmp_path / "cache", names, tmp_path / "img", size=16, workers=0, max_images=3)
    assert not first.complete and first.decoded == 3
    assert not (tmp_path / "cache").exists() and (tmp_path / "cache.partial").is_dir()
    with pytest.raises(CacheMismatchError, match="unfinished one exists"):
        ImageCache(tmp_path / "cache")
    second = build_cache(tmp_path / "cache", names, tmp_path / "img", size=16, workers=2)
    assert second.complete and second.reused == 3 and second.decoded == 4
    assert not (tmp_path / "cache.partial").exists()
    cache = ImageCache(tmp_path / "cache")
    for i, name in enumerate(names):
        np.testing.assert_allclose(cache.read(i), decode_resized(tmp_path / "img" / name, 16) / 255.0, atol=1e-6)


def test_mismatch_is_refused(tmp_path):
    names = write_images(tmp_path / "img", 4)
    build_cache(tmp_path / "cache", names[:3], tmp_path / "img", size=16, workers=0)
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(CacheMismatchError, match="1 of 4 images are not in it.*rerun `agcnn prepare"):
        cache.verify(names, tmp_path / "img")
    with pytest.raises(CacheMismatchError, match="data.cache_size=32"):
        cache.verify(names[:3], tmp_path / "img", size=32)
    # A source file rewritten after the cache was made.
    path = tmp_path / "img" / names[1]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CacheMismatchError, match="1 images changed.*'01.png'"):
        cache.verify(names[:3], tmp_path / "img")
    # Rebuilding replaces the stale cache.
    report = build_cache(tmp_path / "cache", names, tmp_path / "img", size=16, workers=0)
    assert report.complete and report.decoded == 4
    ImageCache(tmp_path / "cache").verify(names, tmp_path / "img")


def test_unusable_file_is_reported_not_fatal(tmp_path):
    names = write_images(tmp_path / "img", 3)
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image at all")
    names.insert(1, "bad.png")
    report = build_cache(tmp_path / "cache", names, tmp_path / "img", size=16, workers=0)
    assert report.complete and [p for p, _ in report.unusable] == ["bad.png"]
    cache = ImageCache(tmp_path / "cache")
    ds = XrayDataset(pd.DataFrame({"path": names, "Nodule": [0.0] * 4}), ["Nodule"], root=tmp_path / "img",
                     cache=cache, cache_rows=cache.verify(names, tmp_path / "img"), name="train")
    assert ds[0]["image"].shape == (1, 16, 16)
    with pytest.raises(ImageLoadError, match="'bad.png'.*recorded by agcnn prepare"):
        ds[1]


def test_prepare_cli_and_cached_dataset(tmp_path):
    root = tmp_path / "ph"
    overrides = [f"data.root={root}", "data.synthetic_count=12", "data.synthetic_size=64", "data.cache_size=64",
                 f"data.cache={tmp_path / 'cache'}", "data.resize=64", "data.image_size=56", "data.highres_size=56"]
    argv = ["prepare", "--workers", "0"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    cfg = Config.load(None, overrides)
    cached = build_datasets(cfg, splits=("test",))["test"]
    cfg.data.cache = None
    plain = build_datasets(cfg, splits=("test",))["test"]
    assert len(cached) == len(plain) > 0
    for i in range(len(plain)):
        a, b = cached[i], plain[i]
        assert torch.equal(a["labels"], b["labels"])
        # Same pixels up to 8-bit rounding of the cache.
        assert (a["image"] - b["image"]).abs().max() < 0.05
    # A cache for a different data set is refused by the dataset factory.
    cfg.data.cache = str(tmp_path / "cache")
    cfg.data.synthetic_seed = 1
    with pytest.raises(CacheMismatchError, match="rerun `agcnn prepare"):
        build_datasets(cfg, splits=("train",))
