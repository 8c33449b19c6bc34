"""Every shipped configuration loads, and the paper configuration says what the paper says."""

from __future__ import annotations

from pathlib import Path

import pytest

from agcnn.config import Config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "agcnn" / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"agcnn_r50.yaml", "agcnn_densenet121.yaml", "agcnn_r50_se.yaml", "agcnn_r50_self.yaml",
            "cpu_small.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_round_trips(path, tmp_path):
    cfg = Config.load(path)
    cfg.dump(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    for stage in ("global", "local", "fusion"):
        assert cfg.stage(stage).epochs >= 1


def test_paper_config_matches_section_4():
    cfg = Config.load(ROOT / "configs" / "agcnn_r50.yaml")
    assert (cfg.model.backbone, cfg.model.pool, cfg.model.threshold) == ("resnet50", "max", 0.7)
    assert [cfg.stage(s).batch_size for s in ("global", "local", "fusion")] == [128, 64, 64]
    for s in ("global", "local", "fusion"):
        sc = cfg.stage(s)
        assert (sc.epochs, sc.lr, sc.momentum, sc.weight_decay, sc.lr_step, sc.lr_gamma) == (50, 0.01, 0.9, 1e-4, 20, 0.1)
    assert cfg.data.dataset == "chestxray14"


def test_densenet_config_takes_the_papers_batches():
    cfg = Config.load(ROOT / "configs" / "agcnn_densenet121.yaml")
    assert cfg.model.backbone == "densenet121"
    assert [cfg.stage(s).batch_size for s in ("global", "local", "fusion")] == [64, 32, 32]


def test_library_defaults_are_the_papers_recipe():
    """A config written for another data set gets the paper's choices unless it says otherwise."""
    cfg = Config()
    assert (cfg.data.augment, cfg.data.resize, cfg.data.image_size, cfg.data.highres_size) == ("paper", 256, 224, 224)
    assert (cfg.model.pool, cfg.model.threshold, cfg.model.heatmap, cfg.model.global_stride) == ("max", 0.7, "channels", 32)
    t = cfg.train
    assert not (t.fusion_from_global or t.cache_fusion_features or t.local_from_global or t.cache_local_crops or t.finetune_all)
    for s in ("global", "local", "fusion"):
        sc = cfg.stage(s)
        assert (sc.optimizer, sc.schedule, sc.epochs, sc.lr, sc.momentum, sc.weight_decay, sc.lr_step, sc.lr_gamma) == \
            ("sgd", "step", 50, 0.01, 0.9, 1e-4, 20, 0.1)
    assert [cfg.stage(s).batch_size for s in ("global", "local", "fusion")] == [128, 64, 64]
    # Where the branches start has no default: a run from scratch must name it.
    assert cfg.model.pretrained is None


def test_shipped_demo_config_equals_the_repository_copy():
    assert (ROOT / "configs" / "demo.yaml").read_text() == (ROOT / "agcnn" / "configs" / "demo.yaml").read_text()


@pytest.mark.parametrize("name", ["agcnn_r50.yaml", "agcnn_densenet121.yaml", "agcnn_r50_se.yaml", "agcnn_r50_self.yaml"])
def test_paper_configs_train_the_paper_recipe(name):
    cfg = Config.load(ROOT / "configs" / name)
    # Sec. 4.2: resize 256, random 224 crop, flip; the local input from the same 224 image.
    assert (cfg.data.augment, cfg.data.resize, cfg.data.image_size, cfg.data.highres_size) == ("paper", 256, 224, 224)
    # The 15-entry label vector (14 findings + No Finding); the label list itself stays 14.
    assert cfg.model.no_finding and len(cfg.labels) == 14
    # Stage III: a randomly started fusion layer on augmented images through the frozen branches.
    assert not cfg.train.fusion_from_global and not cfg.train.cache_fusion_features and not cfg.train.finetune_all


def test_project_config_differs_from_the_paper_only_where_it_says():
    paper = Config.load(ROOT / "configs" / "agcnn_r50.yaml").to_dict()
    ours = Config.load(ROOT / "configs" / "agcnn_r50_highres.yaml").to_dict()
    diff = {f"{s}.{k}" for s in paper if isinstance(paper[s], dict) for k in paper[s] if paper[s][k] != ours[s][k]}
    assert diff == {"data.augment", "data.crop_scale", "data.highres_size", "train.fusion_from_global",
                    "train.cache_fusion_features"}
