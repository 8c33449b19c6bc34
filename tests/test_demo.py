"""``agcnn demo --quick`` end to end: phantoms, three stages, evaluation, prediction."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agcnn.cli import main
from agcnn.config import Config
from agcnn.demo import _changed_call, centres_in_boxes, demo_config_path, small_opacities, to_global_pixels


def test_demo_config_ships_with_the_package():
    cfg = Config.load(demo_config_path())
    assert cfg.data.dataset == "synthetic" and cfg.data.highres_size > cfg.data.image_size


def test_points_map_onto_the_global_input():
    from agcnn.config import DataConfig

    demo = DataConfig(resize=128, image_size=128, highres_size=512)
    np.testing.assert_allclose(to_global_pixels([[256, 256], [0, 512]], 512, demo), [[64, 64], [0, 128]])
    # The paper's geometry: resize 256, centre crop 224 (16 px off each side), on a 1024 px film.
    paper = DataConfig(resize=256, image_size=224, highres_size=224)
    np.testing.assert_allclose(to_global_pixels([[512, 64]], 1024, paper), [[112, 0]])


def test_centres_in_boxes_uses_exclusive_ends():
    boxes = np.array([[10, 10, 20, 20]] * 4)
    inside = centres_in_boxes([[10, 10], [19.9, 19.9], [20, 15], [15, 9.5]], boxes)
    assert inside.tolist() == [True, True, False, False]


def test_small_opacities_lists_nodules_and_lookalikes_of_the_given_images(tmp_path):
    pd.DataFrame({"path": ["a.png", "a.png", "b.png"], "label": ["Nodule", "Mass", "Nodule"],
                  "x0": [0, 5, 10], "y0": [0, 5, 20], "x1": [4, 50, 14], "y1": [2, 50, 30]}).to_csv(tmp_path / "boxes.csv", index=False)
    pd.DataFrame({"path": ["c.png", "z.png"], "kind": ["granuloma", "vessel"], "x0": [1, 1], "y0": [1, 1],
                  "x1": [3, 3], "y1": [5, 5]}).to_csv(tmp_path / "lookalikes.csv", index=False)
    found = small_opacities(tmp_path, ["c.png", "b.png", "a.png"])
    rows = sorted(zip(found["row"], found["kind"], found["cx"], found["cy"]))
    assert rows == [(0, "granuloma", 2.0, 3.0), (1, "nodule", 12.0, 25.0), (2, "nodule", 2.0, 1.0)]


def test_changed_call_picks_a_right_fusion_call_that_global_got_wrong():
    labels = ["Mass", "Nodule"]
    preds = pd.DataFrame({"Nodule": [1, 0, 1, 0], "p_global_Nodule": [0.2, 0.7, 0.3, 0.1],
                          "p_fusion_Nodule": [0.9, 0.2, 0.6, 0.8]})
    points = {"global": [0.5, 0.5], "fusion": [0.5, 0.5]}
    # Rows 0, 1 and 2 are fixed by fusion; row 0 moved most. Row 3 fusion got wrong.
    assert _changed_call(preds, points, labels) == 0
    assert _changed_call(preds.iloc[[3]].reset_index(drop=True), points, labels) is None
    # Operating points alone do not make a change: at the fusion point 0.25 the global
    # probability 0.3 of row 2 was already a right call, so only its own point (0.5) was wrong.
    shifted = {"global": [0.5, 0.5], "fusion": [0.5, 0.25]}
    one = preds.iloc[[2]].reset_index(drop=True).assign(p_fusion_Nodule=0.31)
    assert _changed_call(one, shifted, labels) is None
    assert _changed_call(one.assign(p_global_Nodule=0.2), shifted, labels) == 0
    # Only films whose attended box holds their planted opacity may be shown.
    assert _changed_call(preds, points, labels, eligible=np.array([False, True, True, True])) == 1
    assert _changed_call(preds, points, labels, eligible=np.array([False, False, False, True])) is None


def test_a_run_that_does_not_show_the_mechanism_says_why():
    from agcnn.demo import not_shown

    shown = {"lo": 0.052, "hi": 0.079}
    assert not_shown(shown, {"nodule": (108, 120), "vessel": (1, 48)}) == []
    # The default run's numbers from before: interval reaching 0, 7 of 35 nodules in the box.
    why = not_shown({"lo": -0.020, "hi": 0.023}, {"nodule": (7, 35)})
    assert why == ["the paired interval of fusion - global, -0.020 to +0.023, reaches 0",
                   "the attended box holds 7 of 35 nodules"]
    assert not_shown({"lo": -0.052, "hi": -0.006}, {"nodule": (21, 42)}) == [
        "the paired interval of fusion - global, -0.052 to -0.006, lies below 0: fusion is worse"]
    assert not_shown(shown, {"nodule": (17, 35)}) == ["the attended box holds 17 of 35 nodules"]
    assert not_shown(shown, {"nodule": (18, 35)}) == []
    assert not_shown({"lo": None, "hi": None}, {}) == ["no paired interval (train.bootstrap=0)",
                                                       "the attended box holds 0 of 0 nodules"]


def test_seed_and_control_options_change_only_their_values(tmp_path):
    from agcnn.demo import demo_config

    base = demo_config(tmp_path).to_dict()
    seeded = demo_config(tmp_path, seed=7).to_dict()
    assert seeded["data"].pop("synthetic_seed") == 7 and base["data"].pop("synthetic_seed") == 0
    assert seeded == base
    control = demo_config(tmp_path, same_resolution=True, overrides=["data.image_size=96", "data.resize=96"])
    # The paper's local input: cropped from the image the global branch saw.
    assert control.data.highres_size == control.data.image_size == 96
    assert control.data.synthetic_size == demo_config(tmp_path).data.synthetic_size


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo must not depend on the working directory
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a busy machine
    try:
        assert main(["demo", "--quick", "--out", "d", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    for branch in ("global", "local", "fusion"):
        assert (tmp_path / "d" / "run" / branch / "best.pt").is_file()
        assert any(line.startswith(branch) for line in out.splitlines())
    assert (tmp_path / "d" / "evaluation" / "auc.json").is_file()
    assert (tmp_path / "d" / "predictions" / "predictions.csv").is_file()
    assert "mean AUC" in out and "written:" in out
    # The demo ends with its page: the evaluation and the predictions on one offline file.
    page = tmp_path / "d" / "report.html"
    assert page.is_file() and f"report             {page}" in out
    text = page.read_text()
    assert 'name="agcnn-report" content="demo"' in text and 'id="predict-counts"' in text and "AG-CNN demo" in text
    assert "fusion - global mean AUC" in out and "attended box" in out
    # --quick computes no interval: it never shows the mechanism, and says so in one line.
    said = [line for line in out.splitlines() if "does not show the attention mechanism" in line]
    assert len(said) == 1 and "`agcnn demo --long` (about 22 min on 2 cores) trains longer" in said[0]
    assert "docs/demo.md lists the phantom sets on which --long showed the mechanism and those on which it did not" in said[0]
    _check_picture_only_where_the_box_holds_the_opacity(tmp_path / "d", out)
    _check_attention_on_val(tmp_path / "d")
    # The same command into a fresh folder gives the same table, line by line.
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--out", "d2", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    again = capsys.readouterr().out
    assert _summary(out) == _summary(again) and len(_summary(out)) >= 7
    # A run into a finished folder finds the finished stages and skips them.
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--out", "d", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    assert "skipped" in capsys.readouterr().out
    _check_control_from_the_same_global_stage(tmp_path, capsys)


def _check_control_from_the_same_global_stage(tmp_path: Path, capsys) -> None:
    """--global-from: the control trains the local and fusion stages only, on the same phantoms
    from the same global branch; a run with other settings is refused before any work."""
    import hashlib

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--control-same-resolution", "--global-from", "d", "--out", "c",
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "local input cropped from the global input (control)" in out and "--global-from" in out
    digest = [hashlib.sha256((tmp_path / f / "run" / "global" / "best.pt").read_bytes()).hexdigest() for f in ("d", "c")]
    assert digest[0] == digest[1]
    cfg = Config.load(tmp_path / "c" / "run" / "config.yaml")
    assert cfg.data.highres_size == cfg.data.image_size and Path(cfg.data.root) == tmp_path / "d" / "phantoms"
    assert not (tmp_path / "c" / "phantoms").exists()
    local = torch.load(tmp_path / "c" / "run" / "local" / "best.pt", weights_only=False)
    assert local["config"]["data"]["highres_size"] == cfg.data.image_size
    assert main(["demo", "--quick", "--seed", "3", "--control-same-resolution", "--global-from", "d", "--out", "c3",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.synthetic_seed: 0 there, 3 here" in err and not (tmp_path / "c3").exists()


def _check_picture_only_where_the_box_holds_the_opacity(demo: Path, out: str) -> None:
    from agcnn.data.datasets import build_datasets
    from agcnn.demo import attended_opacities
    from agcnn.inference import load_for_inference

    shown = re.search(r"changed the call on (\S+) ", out)
    picture = demo / "overlay_changed_call.png"
    assert picture.is_file() == (shown is not None)
    if shown is None:
        return
    cfg = Config.load(demo / "run" / "config.yaml")
    loaded = load_for_inference(demo / "run" / "fusion" / "best.pt", "cpu")
    dataset = build_datasets(cfg, splits=("test",))["test"]
    ops, _ = attended_opacities(loaded, dataset, cfg, batch_size=8)
    row = list(dataset.table["path"]).index(shown.group(1))
    assert ops.loc[ops["row"] == row, "inside"].any()


def _check_attention_on_val(demo: Path) -> None:
    """scripts/attention_on_val.py counts every planted opacity of the validation split once."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "attention_on_val.py"
    spec = importlib.util.spec_from_file_location("attention_on_val", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.attention_on_split(demo / "run" / "global" / "best.pt", "val")
    root = demo / "phantoms"
    val = set(pd.read_csv(root / "labels.csv").query("split == 'val'")["path"])
    planted = pd.concat([pd.read_csv(root / "boxes.csv").query("label == 'Nodule'").assign(kind="nodule"),
                         pd.read_csv(root / "lookalikes.csv")])
    want = planted[planted["path"].isin(val)]["kind"].value_counts().to_dict()
    assert {k: n for k, (_, n) in r["inside"].items()} == want and want
    for kind, (inside, n) in r["inside"].items():
        alone, with_large = r["inside_alone"].get(kind, (0, 0)), r["inside_with_large"].get(kind, (0, 0))
        assert alone[0] + with_large[0] == inside <= n == alone[1] + with_large[1]
    assert 0 < r["box_area"] <= 1


def _summary(out: str) -> list[str]:
    """The printed summary from its heading to the timings line (which differs run to run)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AG-CNN demo"))
    end = next(i for i, line in enumerate(lines) if line.startswith("time:"))
    # The overlay's path names the --out folder.
    return [re.sub(r"picture: \S+", "picture: PATH", line) for line in lines[start:end]]


def test_quick_and_long_exclude_each_other(tmp_path):
    from agcnn.config import ConfigError
    from agcnn.demo import demo_config

    with pytest.raises(ConfigError, match="--quick and --long"):
        demo_config(tmp_path, quick=True, long=True)
    long = demo_config(tmp_path, long=True)
    base = demo_config(tmp_path)
    assert long.train.global_.epochs == 2 * base.train.global_.epochs and long.data.synthetic_count == 3 * base.data.synthetic_count
    assert long.train.local == base.train.local and long.model == base.model


def test_overlay_of_a_changed_call_is_written(tmp_path):
    from agcnn.config import DataConfig
    from agcnn.checkpoint import save_checkpoint
    from agcnn.demo import _overlay
    from agcnn.inference import load_for_inference
    from agcnn.models import AGCNN

    class Films:
        """Two 128 px films, seen at 32 px with a 64 px copy."""

        def load(self, i):
            return np.full((128, 128), 0.2 + 0.1 * i, np.float32)

        def __getitem__(self, i):
            return {"image": torch.full((3, 64, 64), 0.1 * i)}

    cfg = Config.load(demo_config_path(), ["data.resize=32", "data.image_size=32", "data.highres_size=64", "model.local_size=32"])
    assert isinstance(cfg.data, DataConfig)
    model = AGCNN.from_config(cfg.model, num_classes=len(cfg.labels), image_size=32).eval()
    save_checkpoint(tmp_path / "m.pt", model_state=model.state_dict(), config=cfg, stage="fusion")
    _overlay(tmp_path / "o.png", load_for_inference(tmp_path / "m.pt"), Films(), 1, np.array([8, 8, 24, 24]), np.random.rand(1, 1).astype(np.float32),
             cfg, "Nodule", 0.8)
    assert (tmp_path / "o.png").stat().st_size > 1000
