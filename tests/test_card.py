"""``agcnn card``: what a checkpoint's model card says, read from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agcnn.card import PAPER_RECIPE, card_markdown, departures, initialisation, model_card
from agcnn.cli import main
from agcnn.config import Config
from agcnn.demo import demo_config_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_paper_configuration_does_not_depart_from_the_paper():
    cfg = Config.load(CONFIGS / "agcnn_r50.yaml").to_dict()
    assert cfg["model"]["pretrained"] == "imagenet" and departures(cfg) == []
    assert initialisation(cfg).startswith("ImageNet")
    cfg["model"]["pretrained"] = "/weights/resnet50-11ad3fa6.pth"  # a local ImageNet file is the paper's start too
    assert departures(cfg) == []
    for random_start in ("none", None):
        cfg["model"]["pretrained"] = random_start
        assert [d[:3] for d in departures(cfg)] == [("model.pretrained", "imagenet", "random")]
    cfg["train"]["local"]["lr"] = 0.02
    assert ("train.local.lr", "0.01", "0.02") in [d[:3] for d in departures(cfg)]


def test_demo_departures_are_named_with_both_values():
    cfg = Config.load(demo_config_path()).to_dict()
    found = {k: (paper, here) for k, paper, here, _ in departures(cfg)}
    assert found["model.heatmap"] == ("channels", "uncertain")
    assert found["model.global_stride"] == ("32", "16")
    assert found["model.pool"] == ("max", "avg")
    assert found["model.pretrained"] == ("imagenet", "random")
    assert found["train.global.optimizer"] == ("sgd", "adamw")
    assert "train.fusion.optimizer" not in found  # the demo's fusion stage keeps SGD
    # A cosine schedule has no step settings to differ in.
    assert not any(k.endswith((".lr_step", ".lr_gamma")) for k in found if k.startswith(("train.global", "train.local")))
    assert set(k.split(".")[0] for k in PAPER_RECIPE) == {"model", "data", "train"}


def test_card_reads_split_and_operating_points_from_the_checkpoint(untrained_checkpoint, tmp_path):
    split = {"version": 1, "settings": {"val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 3},
             "train": {"images": 812, "patients": 345}, "val": {"images": 97, "patients": 41}, "salt": "x",
             "train_patients": []}
    thresholds = [0.25] * 13 + [float("nan")]
    path = untrained_checkpoint(tmp_path / "c.pt", stage="fusion", split=split, operating_points={"fusion": thresholds},
                                operating_points_info={"rule": "youden", "split": "val", "n_images": 97},
                                val_auc={"fusion": [0.8] * 13 + [float("nan")]})
    out = tmp_path / "card.md"
    assert main(["card", str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| train | 812 | 345 |" in text and "| val | 97 | 41 |" in text and "seed 3" in text
    assert "| Nodule | 0.250 |" in text and "| Hernia | n/a |" in text and "(97 images)" in text
    assert "not recorded in this checkpoint" in text  # no calibration stored
    assert "| fusion (validation, training run) | 0.800 |" in text
    assert "Research use only, not for diagnosis" in text
    for item in ("TRIPOD+AI 3b", "CLAIM 24", "TRIPOD+AI 26", "CLAIM 23"):
        assert item in text
    assert "random weights" in text


def test_card_without_records_says_not_recorded(untrained_checkpoint, tmp_path, capsys):
    path = untrained_checkpoint(tmp_path / "bare.pt")
    assert main(["card", str(path)]) == 0
    text = capsys.readouterr().out
    assert "records no split" in text and "not recorded in this checkpoint" in text and "none stored" in text
    assert "say nothing about real radiographs" in text and "natural-language" not in text  # a phantom model


def test_card_takes_intervals_from_an_evaluation_of_the_same_checkpoint(untrained_checkpoint, tmp_path, capsys):
    from agcnn.checkpoint import load_checkpoint
    from agcnn.fileio import sha256_file

    path = untrained_checkpoint(tmp_path / "c.pt")
    ev = tmp_path / "eval"
    ev.mkdir()
    auc = {"checkpoint_sha256": sha256_file(path), "split": {"name": "test"}, "n_images": 120,
           "bootstrap": {"n": 500, "alpha": 0.05, "unit": "patient"},
           "branches": {"fusion": {"trained": True, "mean_auc": 0.8123, "mean_ci": [0.7811, 0.8402]}}}
    (ev / "auc.json").write_text(json.dumps(auc))
    assert main(["card", str(path), "--evaluation", str(ev)]) == 0
    text = capsys.readouterr().out
    assert "| fusion (test split, agcnn evaluate) | 0.812 | 0.781-0.840 | 120 |" in text and "500 resamples" in text
    card = model_card(load_checkpoint(path), path=str(path), sha256=sha256_file(path), evaluation=auc)
    assert card_markdown(card) in text
    # The evaluated set's caveats travel with its numbers.
    auc["split"].update(name="site.csv", caveats=["external site: declared (--external-site) to hold no patient of the "
                                                  "training data; not checked"])
    card = card_markdown(model_card(load_checkpoint(path), path=str(path), sha256=sha256_file(path), evaluation=auc))
    assert "The site.csv set: external site: declared (--external-site)" in card
    auc["split"]["training_split"] = {"problems": ["3 of the 13 patients of the site.csv set have images the checkpoint was trained on"]}
    card = card_markdown(model_card(load_checkpoint(path), path=str(path), sha256=sha256_file(path), evaluation=auc))
    assert "Evaluated with --allow-other-split although 3 of the 13 patients" in card
    auc["checkpoint_sha256"] = "0" * 64
    (ev / "auc.json").write_text(json.dumps(auc))
    assert main(["card", str(path), "--evaluation", str(ev)]) == 2
    assert "evaluated another checkpoint" in capsys.readouterr().err


def test_card_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [(None, "random"), ("none", "random"), ("imagenet", "ImageNet weights (torchvision)"),
                                             ("/w/resnet50.pth", "resnet50.pth")])
def test_initialisation_reads_model_pretrained(value, expected):
    assert expected in initialisation({"model": {"pretrained": value}})


def test_card_shows_the_calibration_agcnn_calibrate_stores(untrained_checkpoint, tmp_path, capsys):
    record = {"id": "a1b2c3d4e5f6", "method": "isotonic", "branches": {"fusion": {}},
              "data": {"name": "the table site.csv", "source": "x", "images": 420, "patients": 180},
              "ece_before": {"fusion": {"width": 0.081, "mass": 0.092}},
              "ece_after": {"fusion": {"width": 0.021, "mass": 0.025}}}
    path = untrained_checkpoint(tmp_path / "cal.pt", calibration=record)
    assert main(["card", str(path)]) == 0
    text = capsys.readouterr().out
    assert "**method**: isotonic" in text and "**id**: a1b2c3d4e5f6" in text
    assert "the table site.csv: 420 images of 180 patients" in text
    assert "| fusion | 0.081 | 0.021 | 0.092 | 0.025 |" in text
