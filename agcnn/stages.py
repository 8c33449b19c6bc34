"""The three training stages (paper Sec. 3.5) as one table, and how a stage freezes the model.

I.   the global branch on the whole image;
II.  the local branch on the attended crops, the global branch fixed (it produces the heatmap);
III. the fusion head on the concatenated pool5 features, both branches fixed -- or, with
     ``train.finetune_all``, everything fine-tuned together (Table II, "G L F*").

Each stage is one :class:`Stage` row: which modules train, which are frozen, which logits are
scored, which branches are reported, which earlier stage's ``best.pt`` seeds it, which cache of
its frozen branches' outputs it may train on, and whether its branch may start as the global one. Training
reads the table to build a stage; ``AGCNN.forward`` to know how far a stage's forward pass
goes; ``checkpoint`` / ``evaluate`` / ``predict`` to know which branches a stage's checkpoint
has trained (the others hold random weights).

Freezing is explicit -- ``requires_grad_(False)`` and ``.eval()`` so frozen batch-norm
statistics do not drift -- never a tiny learning rate.

Imports: the standard library, ``torch.nn`` and :mod:`agcnn.errors` only (the model classes
are reached through their attribute names, so the models may import this module).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from agcnn.errors import ConfigError

# The model's three parts, by branch name, and the AGCNN attribute that holds each.
BRANCHES = ("global", "local", "fusion")
MODULE_OF = {"global": "global_branch", "local": "local_branch", "fusion": "fusion"}
MODULES = tuple(MODULE_OF[b] for b in BRANCHES)


@dataclass(frozen=True)
class Stage:
    """One training stage: what trains, what is frozen, what is scored, what seeds it.

    The stage's name is also how far its forward pass goes (``AGCNN.forward(x, stage=name)``):
    ``global`` computes the global branch only, ``local`` and ``fusion`` all three.
    """

    name: str
    # Modules of AGCNN whose weights the optimizer updates.
    trains: tuple[str, ...]
    # Modules used in the forward pass with fixed weights (requires_grad False, eval mode).
    frozen: tuple[str, ...]
    # The logits the loss and the best-checkpoint selection use.
    scores: str
    # Branches whose validation AUC is reported each epoch.
    reports: tuple[str, ...]
    # The stage whose RUN_DIR/<stage>/best.pt initialises this one (None: start from scratch).
    seed_from: str | None
    # The switch (``train.<name>``) that lets the stage train on what its frozen branches
    # compute once from un-augmented images, instead of running every batch through them
    # (None: no such cache; a stage with nothing frozen has none).
    cache: str | None = None
    # The switch (``train.<name>``) that starts the branch this stage scores as the global
    # branch, when no checkpoint it starts from has trained that branch.
    from_global: str | None = None


STAGE_TABLE: tuple[Stage, ...] = (
    # Stage I (Sec. 3.5): the global branch alone on the whole image.
    Stage("global", trains=("global_branch",), frozen=(), scores="global", reports=("global",), seed_from=None),
    # Stage II: the local branch on crops; the global branch is fixed because its heatmap
    # chooses the crop (Sec. 3.2).
    Stage("local", trains=("local_branch",), frozen=("global_branch",), scores="local",
          reports=("global", "local"), seed_from="global", cache="cache_local_crops", from_global="local_from_global"),
    # Stage III: the fusion head on [global pool5, local pool5] (Sec. 3.4), both branches fixed.
    Stage("fusion", trains=("fusion",), frozen=("global_branch", "local_branch"), scores="fusion",
          reports=("global", "local", "fusion"), seed_from="local", cache="cache_fusion_features",
          from_global="fusion_from_global"),
)
STAGES: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}


def stage_plan(name: str, finetune_all: bool = False) -> Stage:
    """The stage table row for ``name``; ``finetune_all`` turns stage III into Table II's "G L F*"."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(STAGES)} (or 'all')")
    row = STAGES[name]
    if name == "fusion" and finetune_all:
        # Nothing frozen: nothing the branches compute stays the same from epoch to epoch.
        row = dataclasses.replace(row, trains=MODULES, frozen=(), cache=None)
    return row


def trained_by(stage: str) -> tuple[str, ...]:
    """The branches a checkpoint of ``stage`` has trained: its own and those of the stages
    that seeded it. The other branches of its model hold random weights."""
    row = STAGES[stage]
    done = set(trained_by(row.seed_from)) if row.seed_from else set()
    done.update(b for b in BRANCHES if MODULE_OF[b] in row.trains)
    return tuple(b for b in BRANCHES if b in done)


# ---------------------------------------------------------------------- freezing

_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.Dropout)


def _stay_in_eval(module: nn.Module, _inputs: Any) -> None:
    if module.training:
        module.eval()


def apply_freezing(model: nn.Module, plan: Stage) -> None:
    """requires_grad only for the modules the stage trains; the others stay in eval mode.

    Each batch-norm and dropout layer of a module the stage does not train gets a forward
    pre-hook that puts it back into eval mode, so even a plain ``model.train()`` cannot make
    frozen running statistics drift.
    """
    for handle in getattr(model, "_freeze_hooks", []):
        handle.remove()
    hooks = []
    for name in MODULES:
        module = getattr(model, name)
        module.requires_grad_(name in plan.trains)
        if name not in plan.trains:
            module.eval()
            hooks += [m.register_forward_pre_hook(_stay_in_eval) for m in module.modules() if isinstance(m, _MODE_DEPENDENT)]
    if plan.scores == "fusion":
        # The branch classifiers are not in the fusion loss: under G L F* they would get no
        # gradient (which DistributedDataParallel rejects) while their backbones move on.
        for branch in (model.global_branch, model.local_branch):
            branch.classifier.requires_grad_(False)
    model._freeze_hooks = hooks


def set_train_mode(model: nn.Module, plan: Stage) -> None:
    """``model.train()`` for the trained modules, eval mode for everything else.

    Frozen batch-norm layers must keep using (and not update) their running statistics, or
    the global heatmap that picks the crop would shift under the local branch.
    """
    model.train()
    for name in MODULES:
        if name not in plan.trains:
            getattr(model, name).eval()
