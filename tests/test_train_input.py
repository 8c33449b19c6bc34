"""The training input pipeline: stored uint8 images, transforms on the device, persistent workers,
and the ChestX-ray14 cache that training requires."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agcnn.checkpoint import load_checkpoint
from agcnn.config import Config, ConfigError
from agcnn.data.datasets import build_datasets
from agcnn.data.device_transforms import DeviceTransform
from agcnn.data.synthetic import generate_phantoms
from agcnn.runtime import init_runtime
from agcnn.stages import stage_plan
from agcnn.train.context import TrainContext
from agcnn.train.loaders import augment_on_device
from agcnn.train.loop import train
from agcnn.train.sources import ImageSource

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=36", "data.highres_size=48",
    "data.cache_size=64", "train.device=cpu", "train.channels_last=false", "data.augment_on=device",
    "train.global.batch_size=4", "train.global.epochs=2", "data.synthetic_count=24", "data.synthetic_size=64",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, count=24, size=64, seed=0, workers=1)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stored_datasets_yield_uint8_and_carry_their_device_transform(phantoms):
    cfg = Config.load(None, [*TINY, f"data.root={phantoms}"])
    sets = build_datasets(cfg, splits=("train", "val"), training=True, stored=True)
    item = sets["train"][0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 64, 64)
    assert sets["train"].batch_transform.train_mode and not sets["val"].batch_transform.train_mode
    batch = torch.stack([sets["train"][i]["image"] for i in range(4)])
    x = sets["train"].batch_transform(batch)
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32
    # The loader path decodes the same pixels: its evaluation transform agrees with the device's
    # (both from the same 64 px square; the loader path resizes the decoded float image).
    plain = build_datasets(cfg, splits=("val",))["val"]
    dev = sets["val"].batch_transform(sets["val"][0]["image"][None])[0]
    assert (dev - plain[0]["image"]).abs().mean() < 0.05


def test_augment_on_auto_means_the_device_only_on_cuda():
    cfg = Config.load(None, ["data.augment_on=auto"])
    assert augment_on_device(cfg, torch.device("cuda")) and not augment_on_device(cfg, torch.device("cpu"))
    assert augment_on_device(Config.load(None, ["data.augment_on=device"]), torch.device("cpu"))
    assert not augment_on_device(Config.load(None, ["data.augment_on=loader"]), torch.device("cuda"))


def test_persistent_loader_draws_what_a_new_one_draws(phantoms):
    # Reused across epochs (workers kept), the loader gives epoch N the order and crops a fresh
    # loader for epoch N gives -- which is what makes a resumed run match an uninterrupted one.
    cfg = Config.load(None, [*TINY, f"data.root={phantoms}", "data.num_workers=1"])
    sets = build_datasets(cfg, splits=("train", "val"), training=True, stored=True)
    rt = init_runtime("cpu")

    def epoch_batches(source, epoch):
        loader = source.loader(epoch)
        tf = sets["train"].batch_transform
        return [(b["index"].tolist(), tf.draw(len(b["index"]))[0].tolist()) for b in loader]

    reused = ImageSource(None, stage_plan("global"), TrainContext(cfg, rt), sets, 4)
    runs = [epoch_batches(reused, e) for e in range(3)]
    assert reused._loaders["train"].persistent_workers
    fresh = [epoch_batches(ImageSource(None, stage_plan("global"), TrainContext(cfg, rt), sets, 4), e)
             for e in range(3)]
    assert runs == fresh
    assert runs[0] != runs[1]


def test_training_with_device_transforms_resumes_to_the_same_weights(phantoms, tmp_path):
    cfg = Config.load(None, [*TINY, f"data.root={phantoms}", "data.num_workers=0"])
    full = train(cfg, tmp_path / "full", ("global",), progress=False, say=lambda _m: None)
    assert full["global"].epochs == 2
    part = Config.load(None, [*TINY, f"data.root={phantoms}", "data.num_workers=0", "train.global.epochs=1"])
    train(part, tmp_path / "part", ("global",), progress=False, say=lambda _m: None)
    train(cfg, tmp_path / "part", ("global",), resume=True, progress=False, say=lambda _m: None)
    a = load_checkpoint(tmp_path / "full" / "global" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "global" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chestxray14_training_without_its_cache_names_the_prepare_command(tmp_path):
    import pandas as pd

    from agcnn.labels import LABELS

    cfg = Config.from_dict({"data": {"dataset": "chestxray14", "root": str(tmp_path / "nih")}})
    table = pd.DataFrame({"path": ["00000001_000.png"], "patient": ["1"], "split": ["train"], **{k: [0.0] for k in LABELS}})
    with pytest.raises(ConfigError, match=r"agcnn-cache-512.*agcnn prepare --config cfg.yaml.*data.decode_originals=true"):
        build_datasets(cfg, splits=("train",), table=table, training=True, config_path="cfg.yaml")
    # Outside training, and with the originals chosen explicitly, nothing requires the cache.
    from agcnn.data.cache import cache_folder, require_cache

    assert cache_folder(cfg.data) == tmp_path / "nih" / "agcnn-cache-512"
    cfg.data.decode_originals = True
    assert require_cache(cfg.data) is None


def test_device_transform_is_float32_under_autocast():
    t = DeviceTransform(train=True, resize=36, image_size=32)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 40, 40), dtype=np.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert t(x).dtype == torch.float32
