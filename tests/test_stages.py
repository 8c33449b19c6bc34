"""The stage table: what each stage trains, freezes, scores and starts from (paper Sec. 3.5)."""

from __future__ import annotations

import pytest

from agcnn.checkpoint import CheckpointError, trained_branches
from agcnn.stages import BRANCHES, MODULES, STAGE_TABLE, STAGES, stage_plan, trained_by


def test_stage_table_rows():
    rows = {s.name: s for s in STAGE_TABLE}
    assert list(rows) == ["global", "local", "fusion"] == list(STAGES)
    assert rows["global"].trains == ("global_branch",) and rows["global"].seed_from is None
    assert rows["local"].frozen == ("global_branch",) and rows["local"].scores == "local" and rows["local"].seed_from == "global"
    assert rows["fusion"].frozen == ("global_branch", "local_branch") and rows["fusion"].seed_from == "local"
    # Table II "G L F*": stage III fine-tunes everything.
    star = stage_plan("fusion", finetune_all=True)
    assert star.trains == MODULES and star.frozen == ()
    with pytest.raises(ValueError, match="unknown stage 'fusoin'"):
        stage_plan("fusoin")


@pytest.mark.parametrize("stage, trained", [
    ("global", ("global",)),
    ("local", ("global", "local")),
    ("fusion", ("global", "local", "fusion")),
])
def test_a_stage_has_trained_its_own_branch_and_those_of_its_seeds(stage, trained):
    assert trained_by(stage) == trained
    assert trained_branches({"stage": stage}) == trained


def test_a_checkpoint_without_a_stage_is_a_complete_model_and_an_unknown_stage_is_refused():
    assert trained_branches({}) == BRANCHES
    with pytest.raises(CheckpointError, match="stage 'fusoin'; expected one of"):
        trained_branches({"stage": "fusoin"})
