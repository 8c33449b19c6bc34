"""``agcnn card``: the model card of a checkpoint, in Markdown, and as the data every report page shows.

A card says what a reader of a paper or an ethics board needs before trusting the weights, and
only what the checkpoint (and, when given, an evaluation of it) records -- nothing is guessed:
a value the checkpoint does not hold is written as "not recorded".

Its sections follow the items of two reporting checklists that software can fill; each section
names them. TRIPOD+AI (Collins et al., BMJ 2024; 27 items): 3b intended purpose and users, 5a data sources,
12a how the data were used (development / evaluation), 12c model type, building and tuning,
12e performance measures, 15 model output (thresholds), 18f code, 20a flow of data,
22 model specification, 23a performance with confidence intervals, 26 limitations.
CLAIM (Mongan et al., Radiology: AI 2020; 42 items): 7 data sources, 20 partitions,
21 level at which partitions are disjoint, 22 model description, 23 software, 24 initialisation,
25 training approach, 26 selection of the final model, 28 metrics, 29 uncertainty,
31 explainability, 35 performance on the partitions, 38 limitations, 39 intended use. (The 2024
update of CLAIM, Tejani et al., 44 items, keeps 7 and 22-31 and renumbers the rest: 20 and 21
become 19 and 20, 35 becomes 37, 38 becomes 40, 39 becomes 41.)
The rest of both checklists (eligibility, ground truth, ethics, ...) belongs to the study, not
to the software, and is left to its authors.

The paper's recipe lives in :data:`PAPER_RECIPE`, the one list the card compares a checkpoint's
configuration against.
"""

from __future__ import annotations

import argparse
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agcnn import __version__

# Guan et al. 2018 (arXiv:1801.09927): the value of each setting in the paper and where it says so.
# Dotted keys of the config; ``train.*`` stage keys hold for each of the three stages.
PAPER_RECIPE: dict[str, tuple[Any, str]] = {
    "model.backbone": ("resnet50", "Sec. 4.2 (DenseNet-121 as the second backbone, Table I)"),
    "model.attention": ("none", "Sec. 3 (no attention blocks inside the branches)"),
    "model.pool": ("max", "Sec. 3.1, pool5 is global max pooling"),
    "model.threshold": (0.7, "Eq. 4, tau = 0.7"),
    "model.heatmap": ("channels", "Eq. 3, the largest |activation| over channels"),
    "model.global_stride": (32, "Sec. 3.1, the backbone's 7 x 7 map at 224 px"),
    "model.local_size": (224, "Sec. 3.2, the crop resized to 224 x 224"),
    "model.no_finding": (True, "Sec. 4.1, 15 outputs: 14 findings and No Finding"),
    "model.pretrained": ("imagenet", "Sec. 4.2, both branches from ImageNet weights"),
    "data.resize": (256, "Sec. 4.2, images resized to 256 x 256"),
    "data.image_size": (224, "Sec. 4.2, random 224 crop (centre crop at test)"),
    "data.highres_size": (224, "Sec. 3.2, the crop is cut from the same 224 image"),
    "data.augment": ("paper", "Sec. 4.2, random crop and horizontal flip"),
    "train.optimizer": ("sgd", "Sec. 4.2, SGD"),
    "train.momentum": (0.9, "Sec. 4.2, momentum 0.9"),
    "train.weight_decay": (0.0001, "Sec. 4.2, weight decay 1e-4"),
    "train.lr": (0.01, "Sec. 4.2, learning rate 0.01"),
    "train.schedule": ("step", "Sec. 4.2, divided by 10 every 20 epochs"),
    "train.lr_step": (20, "Sec. 4.2"),
    "train.lr_gamma": (0.1, "Sec. 4.2"),
    "train.epochs": (50, "Sec. 4.2, 50 epochs"),
    "train.global.batch_size": (128, "Sec. 4.2, batch 128 for the global branch"),
    "train.local.batch_size": (64, "Sec. 4.2, batch 64 for the local branch"),
    "train.fusion.batch_size": (64, "Sec. 4.2, batch 64 for the fusion branch"),
    "train.finetune_all": (False, "Table II, 'G L F' (True is 'G L F*')"),
    "train.fusion_from_global": (False, "Sec. 3.4, the fusion layer starts at random"),
    "train.local_from_global": (False, "Sec. 4.2, the local branch from ImageNet weights"),
    "train.cache_fusion_features": (False, "Sec. 4.2, augmented images through the frozen branches"),
    "train.cache_local_crops": (False, "Sec. 4.2, augmented images through the frozen global branch"),
}
STAGE_NAMES = ("global", "local", "fusion")

INTENDED_USE = (
    "Research use only, not for diagnosis. agcnn scores frontal chest radiographs for the 14 ChestX-ray14 "
    "findings, to study attention-guided classification and to screen research data sets. Its outputs are not "
    "a medical device's, have not been validated for any clinical decision, and must not reach a patient's "
    "care or record."
)
LIMITATIONS = (
    "Trained and validated on the data named under 'Training data' only: performance on another hospital's "
    "equipment, population or view mix is unknown until measured there (agcnn evaluate on a labelled sample).",
    "Frontal (PA / AP) chest radiographs only; other body parts and lateral views are refused unless the "
    "scope checks are switched off.",
    "The attended box and the class activation maps show where the model looked, not why; a box on the right "
    "region does not make the call right.",
    "Operating points were chosen on the validation split for the highest Youden index; a site with another "
    "prevalence or purpose needs its own.",
)


@dataclass
class Section:
    """One part of the card: a title, the checklist items it answers, fields, an optional table."""

    title: str
    items: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Card:
    title: str
    sections: list[Section]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _short(x: Any) -> str:
    """A setting's value as written in a config: 0.0001, not 0.000."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def initialisation(cfg: dict[str, Any]) -> str:
    """ImageNet or random, as the checkpoint's ``model.pretrained`` records it."""
    value = _get(cfg, "model.pretrained")
    if value in (None, "", False, "none", "random"):
        return "random weights (no ImageNet start)"
    if value == "imagenet":
        return "ImageNet weights (torchvision)"
    return f"ImageNet weights from a local file ({Path(str(value)).name})"


def departures(cfg: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(setting, paper, this model, where in the paper)`` for every setting of
    :data:`PAPER_RECIPE` the configuration does not follow; stage settings once per stage."""
    out = []
    train = cfg.get("train", {})
    for key, (paper, where) in PAPER_RECIPE.items():
        parts = key.split(".")
        if parts[0] == "train" and len(parts) == 2:
            keys = [f"train.{s}.{parts[1]}" for s in STAGE_NAMES if isinstance(train.get(s), dict)]
            keys = keys or [key]
        else:
            keys = [key]
        for k in keys:
            here = _get(cfg, k)
            if key == "model.pretrained":
                if here not in (None, "", False, "none", "random"):
                    continue  # any ImageNet start, from a named file or the enum, is the paper's
                here = "random"
            if parts[-1] in ("lr_step", "lr_gamma") and _get(cfg, k.rsplit(".", 1)[0] + ".schedule") not in (None, "step"):
                continue  # the step schedule's settings do nothing under another schedule
            if here is None or here == paper or (isinstance(paper, float) and isinstance(here, (int, float))
                                                 and math.isclose(here, paper)):
                continue
            out.append((k, _short(paper), _short(here), where))
    return out


def _per_class(values: Any, labels: Sequence[str]) -> dict[str, float | None]:
    if isinstance(values, dict):
        return {n: values.get(n) for n in labels}
    if isinstance(values, (list, tuple)) and len(values) == len(labels):
        return {n: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
                for n, v in zip(labels, values)}
    return {}


def _mean(values: dict[str, float | None]) -> float | None:
    seen = [v for v in values.values() if v is not None]
    return sum(seen) / len(seen) if seen else None


def model_card(ckpt: dict[str, Any], *, path: str | None = None, sha256: str | None = None,
               evaluation: dict[str, Any] | None = None) -> Card:
    """The card of a loaded checkpoint. ``evaluation``: an ``auc.json`` of this checkpoint, whose
    per-branch AUCs with intervals then stand beside the validation numbers training recorded."""
    name = Path(path).name if path else "checkpoint"
    sections = [_model(ckpt), _initialisation(ckpt), _data(ckpt), _recipe(ckpt), _performance(ckpt, evaluation),
                _calibration(ckpt), _operating_points(ckpt),
                Section("Intended use", "TRIPOD+AI 3b; CLAIM 39", fields=[("use", INTENDED_USE)]),
                _limitations(ckpt), _versions(ckpt, name, sha256)]
    return Card(title=f"Model card: {name}", sections=sections)


def _parts(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    cfg = ckpt.get("config") or {}
    return cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})


def _model(ckpt: dict[str, Any]) -> Section:
    m, d, _ = _parts(ckpt)
    labels = list(ckpt.get("labels") or [])
    return Section("Model", "TRIPOD+AI 12c, 22; CLAIM 22, 31", fields=[
        ("architecture", f"AG-CNN (Guan et al. 2018): global and local {m.get('backbone', 'n/a')} branches"
                         f"{'' if m.get('width', 64) == 64 else ', width ' + str(m.get('width'))} and a fusion head"),
        ("attention blocks", str(m.get("attention", "n/a"))),
        ("attended region", f"heatmap {m.get('heatmap', 'channels')}, threshold {m.get('threshold', 'n/a')}, "
                            f"global stride {m.get('global_stride', 32)}, crop resized to {m.get('local_size', 'n/a')} px"),
        ("pooling", str(m.get("pool", "n/a"))),
        ("input", f"{d.get('image_size', 'n/a')} px global view (resize {d.get('resize', 'n/a')}), local crop from a "
                  f"{d.get('highres_size', 'n/a')} px copy"),
        ("outputs", f"{len(labels)} findings ({', '.join(labels)})" + ("; No Finding as an extra training target"
                                                                        if m.get("no_finding") else "")),
        ("stage", f"{ckpt.get('stage') or 'fusion'} (trained branches: "
                  f"{', '.join((ckpt.get('plan') or {}).get('reports', STAGE_NAMES))})"),
        ("explanations", "attended box (the local branch's crop) and class activation maps per finding"),
    ])


def _initialisation(ckpt: dict[str, Any]) -> Section:
    _, _, t = _parts(ckpt)
    return Section("Initialisation", "TRIPOD+AI 12c; CLAIM 24", fields=[
        # As training recorded it (``start``), else read from model.pretrained.
        ("weights at the start", ckpt.get("start") or initialisation(ckpt.get("config") or {})),
        ("local branch", "copy of the trained global branch" if t.get("local_from_global") else "as the global branch"),
        ("fusion layer", "starts as the global classifier" if t.get("fusion_from_global") else "random"),
    ])


def _data(ckpt: dict[str, Any]) -> Section:
    from agcnn.data.provenance import current_run, statements, upgrade

    _, d, _ = _parts(ckpt)
    split, record = current_run(ckpt), upgrade(ckpt.get("split"))
    fields = [("data set", str(d.get("dataset", "n/a"))),
              ("tables / lists", ", ".join(f"{k} {d[k]}" for k in ("metadata", "train_list", "val_list", "test_list")
                                           if d.get(k)) or "defaults of the data set"),
              ("views", ", ".join(d.get("views") or []) or "all frontal (PA and AP)")]
    table, notes = None, []
    if split:
        s = split.get("settings", {})
        fields.append(("split", f"patient-wise; validation fraction {s.get('val_fraction')}, test fraction "
                                f"{s.get('test_fraction')}, seed {s.get('split_seed')}"))
        table = (["partition", "images", "patients"],
                 [[p, str(split[p].get("images", "n/a")), str(split[p].get("patients", "n/a"))] for p in ("train", "val")
                  if p in split])
        notes.append(f"Training and validation patients are disjoint; the checkpoint keeps counts and digests of both sets "
                     f"for each of the {len(record['runs'])} training run(s) behind its branches (with the site key, keyed "
                     f"hashes of their patients), so an evaluation that overlaps them is refused.")
        notes += statements(ckpt)
    else:
        notes.append("The checkpoint records no split (written before agcnn recorded it): counts not recorded.")
    if ckpt.get("left_out"):
        notes.append(f"{sum(r.get('files', 1) for r in ckpt['left_out'])} listed images were left out of training as unreadable.")
    return Section("Training data and split", "TRIPOD+AI 5a, 12a, 20a; CLAIM 7, 20, 21", fields=fields, table=table,
                   notes=notes)


def _recipe(ckpt: dict[str, Any]) -> Section:
    _, d, t = _parts(ckpt)
    deps = departures(ckpt.get("config") or {})
    stages = [f"{s}: {st.get('optimizer', 'sgd')} lr {st.get('lr')} ({st.get('schedule', 'step')}), "
              f"{st.get('epochs')} epochs, batch {st.get('batch_size')}" for s in STAGE_NAMES if (st := t.get(s))]
    return Section("Recipe", "TRIPOD+AI 12c; CLAIM 25, 26", fields=[
        ("stages", "; ".join(stages) or "not recorded"),
        ("augmentation", f"{d.get('augment', 'n/a')}" + (f", crop scale {d.get('crop_scale')}" if d.get("augment") == "resized_crop" else "")),
        ("model selection", f"best validation mean AUC of the scored branch (epoch {ckpt.get('best_epoch', 'n/a')} of "
                            f"{ckpt.get('epoch', 'n/a')})"),
        ("precision", f"inference at {t.get('inference_precision', 'fp32')}; training amp {t.get('amp')}"),
        ("departures from the paper", f"{len(deps)}" if deps else "none: the paper's recipe"),
    ], table=(["setting", "paper", "this model", "paper reference"], [list(r) for r in deps]) if deps else None)


def _performance(ckpt: dict[str, Any], evaluation: dict[str, Any] | None) -> Section:
    labels = list(ckpt.get("labels") or [])
    from agcnn.data.provenance import current_run

    val, split = ckpt.get("val_auc") or {}, current_run(ckpt) or {}
    rows = [[f"{b} (validation, training run)", _fmt(_mean(per)), "not recorded", str(split.get("val", {}).get("images", "n/a"))]
            for b in STAGE_NAMES if (per := _per_class(val.get(b), labels))]
    notes = ["Validation: the split the final epoch was chosen on, so these numbers are optimistic."]
    if evaluation:
        evaluated = evaluation.get("split") or {}
        name = evaluated.get("name", "?")
        for b, r in evaluation.get("branches", {}).items():
            if r.get("trained"):
                lo, hi = r.get("mean_ci") or [None, None]
                rows.append([f"{b} ({name} split, agcnn evaluate)", _fmt(r.get("mean_auc")),
                             f"{_fmt(lo)}-{_fmt(hi)}" if lo is not None else "none computed",
                             str(evaluation.get("n_images", "n/a"))])
        bs = evaluation.get("bootstrap", {})
        if bs.get("n"):
            notes.append(f"Intervals: {100 * (1 - bs.get('alpha', 0.05)):.0f} % percentile bootstrap over "
                         f"{'patients' if bs.get('unit') == 'patient' else 'images'}, {bs['n']} resamples.")
        # What the evaluation's own report says of its set, said here too.
        notes += [f"The {name} set: {c}." for c in evaluated.get("caveats", [])]
        problems = (evaluated.get("training_split") or {}).get("problems")
        if problems:
            notes.append(f"Evaluated with --allow-other-split although {'; and '.join(problems)}: not a held-out "
                         f"evaluation of this checkpoint.")
    else:
        notes.append("Intervals are computed by `agcnn evaluate` (its report shows them beside this card).")
    return Section("Performance (mean AUC over the findings)", "TRIPOD+AI 12e, 23a; CLAIM 28, 29, 35",
                   table=(["branch and data", "mean AUC", "95 % interval", "images"], rows), notes=notes)


def _calibration(ckpt: dict[str, Any]) -> Section:
    """The checkpoint's ``calibration`` record (``agcnn calibrate``): method, the data it was fitted
    on, the expected calibration error before and after; any other plain value as it is."""
    cal = ckpt.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return Section("Calibration", "TRIPOD+AI 12e, 23a", fields=[("calibration", "not recorded in this checkpoint")])
    fields = [(k, _fmt(cal[k])) for k in ("method", "id") if k in cal]
    data = cal.get("data")
    if isinstance(data, dict):
        fields.append(("fitted on", f"{data.get('name', 'n/a')}: {data.get('images', 'n/a')} images"
                                    + (f" of {data['patients']} patients" if data.get("patients") else "")))
    rows = []
    for b in STAGE_NAMES:
        before, after = (cal.get(k, {}).get(b) for k in ("ece_before", "ece_after"))
        if isinstance(before, dict) and isinstance(after, dict):
            rows.append([b, *(_fmt(x.get(binning)) for binning in ("width", "mass") for x in (before, after))])
    for k, v in cal.items():
        if k not in ("method", "id", "data", "branches", "ece_before", "ece_after") and (
                isinstance(v, (str, int, float, bool)) or v is None):
            fields.append((str(k), _fmt(v)))
    table = (["branch", "ECE before (equal width)", "after", "ECE before (equal mass)", "after"], rows) if rows else None
    notes = ["Expected calibration error (mean over the findings) on the data the calibration was fitted on."] if rows else []
    return Section("Calibration", "TRIPOD+AI 12e, 23a", fields=fields, table=table, notes=notes)


def _operating_points(ckpt: dict[str, Any]) -> Section:
    labels = list(ckpt.get("labels") or [])
    ops = ckpt.get("operating_points") or {}
    fields, table = [], None
    if ops:
        info = ckpt.get("operating_points_info") or {}
        fields.append(("rule", f"{info.get('rule', 'youden')} on the {info.get('split', 'val')} split"
                               + (f" ({info['n_images']} images)" if info.get("n_images") else "")))
        branches = [b for b in STAGE_NAMES if b in ops]
        table = (["finding", *branches], [[n, *(_fmt(_per_class(ops[b], labels).get(n)) for b in branches)] for n in labels])
    else:
        fields.append(("operating points", "none stored: predict writes probabilities without calls"))
    return Section("Operating points (probability at which a finding is called)", "TRIPOD+AI 15", fields=fields,
                   table=table)


def _limitations(ckpt: dict[str, Any]) -> Section:
    _, d, _ = _parts(ckpt)
    data_limits = {
        "chestxray14": "ChestX-ray14 labels were mined from reports by natural-language processing and are noisy "
                       "(Wang et al. 2017): the AUCs are agreement with those labels, not with radiologists.",
        "synthetic": "Trained on generated phantoms (agcnn.data.synthetic): the weights show that the pipeline "
                     "works and say nothing about real radiographs.",
    }
    own = [data_limits[d["dataset"]]] if d.get("dataset") in data_limits else []
    return Section("Known limitations", "TRIPOD+AI 26; CLAIM 38", notes=[*LIMITATIONS[:1], *own, *LIMITATIONS[1:]])


def _versions(ckpt: dict[str, Any], name: str, sha256: str | None) -> Section:
    return Section("Versions", "TRIPOD+AI 18f; CLAIM 23", fields=[
        ("trained with", f"agcnn {ckpt.get('agcnn_version', 'n/a')}"),
        ("card written by", f"agcnn {__version__}, Python {platform.python_version()}{_torch_version()}"),
        ("checkpoint", f"{name}" + (f", sha256 {sha256}" if sha256 else "")),
        ("code", "agcnn (Apache-2.0), AG-CNN after Guan et al., arXiv:1801.09927"),
    ])


def _torch_version() -> str:
    try:
        import torch
        import torchvision
    except ImportError:  # pragma: no cover - both are dependencies
        return ""
    return f", torch {torch.__version__}, torchvision {torchvision.__version__}"


def card_markdown(card: Card) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {card.title}", ""]
    for s in card.sections:
        lines += [f"## {s.title}", "", f"*Checklist items: {s.items}*", ""]
        for k, v in s.fields:
            lines.append(f"- **{k}**: {v}")
        if s.fields:
            lines.append("")
        if s.table and s.table[1]:
            header, rows = s.table
            lines.append("| " + " | ".join(cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
            lines.append("")
        for n in s.notes:
            lines.append(f"- {n}")
        if s.notes:
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint (.pt) written by `agcnn train`")
    parser.add_argument("--out", default=None, help="write the Markdown here instead of standard output")
    parser.add_argument("--evaluation", default=None, metavar="DIR",
                        help="an `agcnn evaluate` folder of this checkpoint: its AUCs with intervals go into the card")


def load_evaluation(folder: str | Path, sha256: str | None) -> dict[str, Any]:
    """``auc.json`` of an evaluate folder, refused when it scored another checkpoint."""
    import json

    from agcnn.errors import UsageError

    path = Path(folder) / "auc.json"
    if not path.is_file():
        raise UsageError(f"--evaluation {str(folder)!r} holds no auc.json; pass the --out folder of `agcnn evaluate`")
    report = json.loads(path.read_text())
    if sha256 and report.get("checkpoint_sha256") not in (None, sha256):
        raise UsageError(f"--evaluation {str(folder)!r} evaluated another checkpoint (sha256 "
                         f"{str(report.get('checkpoint_sha256'))[:12]}..., this one {sha256[:12]}...)")
    return report


def run(args: argparse.Namespace) -> int:
    from agcnn.checkpoint import load_checkpoint
    from agcnn.fileio import sha256_file

    ckpt = load_checkpoint(args.checkpoint)
    sha = sha256_file(args.checkpoint)
    evaluation = load_evaluation(args.evaluation, sha) if args.evaluation else None
    text = card_markdown(model_card(ckpt, path=args.checkpoint, sha256=sha, evaluation=evaluation))
    if args.out:
        Path(args.out).write_text(text)
        print(f"model card written to {args.out}")
    else:
        print(text, end="")
    return 0
