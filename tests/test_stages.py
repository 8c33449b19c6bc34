"""The stage table: what each stage trains, freezes, scores and starts from (paper Sec. 3.5)."""

from __future__ import annotations

import pytest
import torch

from agcnn.checkpoint import CheckpointError, trained_branches
from agcnn.metrics import masked_bce_with_logits
from agcnn.stages import BRANCHES, MODULES, STAGE_TABLE, STAGES, apply_freezing, set_train_mode, stage_plan, trained_by


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


def test_each_row_names_its_cache_and_start_switches_and_a_stage_with_nothing_frozen_has_no_cache():
    from dataclasses import fields

    from agcnn.config import TrainConfig
    from agcnn.train.sources import CACHED_SOURCES

    switches = {f.name for f in fields(TrainConfig) if f.type in (bool, "bool")}
    for row in STAGE_TABLE:
        assert row.cache is None or (row.cache in switches and row.cache in CACHED_SOURCES and row.frozen), row
        assert row.from_global is None or (row.from_global in switches and row.scores != "global"), row
    assert {r.name: r.cache for r in STAGE_TABLE} == {"global": None, "local": "cache_local_crops",
                                                      "fusion": "cache_fusion_features"}
    # G L F*: the branches move every step, so nothing they compute can be cached.
    assert stage_plan("fusion", finetune_all=True).cache is None
    assert stage_plan("fusion", finetune_all=True).from_global == "fusion_from_global"


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


# ---------------------------------------------------------------------- freezing

def test_local_step_leaves_frozen_global_branch_untouched(tiny_model):
    model = tiny_model
    plan = stage_plan("local")
    apply_freezing(model, plan)
    set_train_mode(model, plan)
    assert model.local_branch.training and not model.global_branch.training and not model.fusion.training
    before = {k: v.clone() for k, v in model.global_branch.state_dict().items()}
    local_before = {k: v.clone() for k, v in model.local_branch.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 48, 48), (torch.rand(4, model.num_classes) < 0.5).float()
    loss = masked_bce_with_logits(model(x, stage="local").local_logits, y)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.global_branch.parameters())
    # Weights and batch-norm running statistics of the frozen branch are unchanged.
    after = model.global_branch.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(local_before[k], v) for k, v in model.local_branch.state_dict().items())


def test_fusion_stage_freezes_both_branches_even_after_model_train(tiny_model):
    model = tiny_model
    plan = stage_plan("fusion")
    apply_freezing(model, plan)
    set_train_mode(model, plan)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fusion.weight", "fusion.bias"]
    assert not model.global_branch.training and not model.local_branch.training
    # Even a plain model.train() (as other code might call) leaves the frozen statistics alone.
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fusion.")}
    with torch.no_grad():
        model(torch.randn(4, 3, 48, 48), stage="fusion")
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bns = [m for m in model.global_branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    # A later stage plan lifts the hooks it no longer needs.
    apply_freezing(model, stage_plan("global"))
    set_train_mode(model, stage_plan("global"))
    model(torch.randn(4, 3, 48, 48), stage="global")
    assert model.global_branch.training


def test_finetune_all_keeps_the_unscored_branch_classifiers_fixed(tiny_model):
    model = tiny_model
    plan = stage_plan("fusion", finetune_all=True)
    apply_freezing(model, plan)
    assert model.global_branch.features.conv1.weight.requires_grad
    assert model.local_branch.features.conv1.weight.requires_grad
    assert not model.global_branch.classifier.weight.requires_grad
    assert not model.local_branch.classifier.weight.requires_grad
    assert model.fusion.weight.requires_grad
