"""The sections of an evaluation's page, from what ``agcnn evaluate`` wrote (``auc.json``, ``roc.png``,
``predictions.csv``, ``reliability.png`` where a calibration step added it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agcnn.pages.html import esc, file_uri, img, num, num_cell, table
from agcnn.report import PAPER_NOTE

BRANCHES = ("global", "local", "fusion")


def calibration_error(r: dict[str, Any], labels: list[str]) -> tuple[float | None, dict[str, float | None]]:
    """A branch's calibration error, as a number for the branch and per finding, where recorded.

    ``ece`` is, as ``agcnn evaluate`` writes it, per binning (``width`` / ``mass``) the per-finding
    ``ece`` and the branch's ``mean`` (the equal-width values are shown); it may also be a number
    (the branch's) or a mapping: per finding by name or under
    ``per_class`` / ``per_finding``, with ``mean`` for the branch; ``ece_per_class`` /
    ``ece_by_finding`` beside it hold the per-finding values where kept apart.
    """
    value = r.get("ece")
    per: dict[str, float | None] = {}
    mean = None
    if isinstance(value, (int, float)):
        mean = float(value)
    elif isinstance(value, dict) and isinstance(value.get("width"), dict):
        # agcnn evaluate's shape: per binning ("width", "mass") the per-finding "ece" and the "mean";
        # the equal-width one is what reliability.png draws.
        width = value["width"]
        mean = width.get("mean") if isinstance(width.get("mean"), (int, float)) else None
        per = {n: v for n, v in (width.get("ece") or {}).items() if n in labels and isinstance(v, (int, float))}
    elif isinstance(value, dict):
        mean = next((value[k] for k in ("mean", "branch", "overall") if isinstance(value.get(k), (int, float))), None)
        per = {n: value.get(n) for n in labels if isinstance(value.get(n), (int, float))}
        for key in ("per_class", "per_finding", "by_finding", "classes"):
            if isinstance(value.get(key), dict):
                per.update({n: value[key][n] for n in labels if isinstance(value[key].get(n), (int, float))})
    for key in ("ece_per_class", "ece_by_finding", "ece_per_finding"):
        if isinstance(r.get(key), dict):
            per.update({n: r[key].get(n) for n in labels if isinstance(r[key].get(n), (int, float))})
    return mean, per


def auc_table(auc: dict[str, Any]) -> str:
    """Findings x branches, each cell the AUC with its interval; the mean row first in bold."""
    labels = list(auc["labels"])
    branches = auc["branches"]
    shown = [b for b in BRANCHES if branches.get(b, {}).get("trained")]
    eces = {b: calibration_error(branches[b], labels) for b in shown}
    with_ece = [b for b in shown if eces[b][0] is not None or eces[b][1]]
    header = ["finding", "positives", *(f"{b} AUC [95 % CI]" for b in shown), *(f"{b} ECE (equal width)" for b in with_ece)]

    def cell(b: str, v, lo, hi, key: str) -> str:
        ci = f' <span class="ci">[{esc(num(lo))}, {esc(num(hi))}]</span>' if lo is not None else ""
        return num_cell(v, extra=ci).replace("<td ", f'<td data-branch="{esc(b)}" data-key="{esc(key)}" ', 1)

    rows = []
    mean_row = [f"<th>mean ({max(branches[b].get('classes_in_mean', 0) for b in shown) if shown else 0} of "
                f"{len(labels)} findings)</th>", "<td></td>"]
    for b in shown:
        r = branches[b]
        lo, hi = r.get("mean_ci") or [None, None]
        mean_row.append(cell(b, r.get("mean_auc"), lo, hi, "mean").replace("<td ", "<td style=\"font-weight:700\" ", 1))
    for b in with_ece:
        mean_row.append(num_cell(eces[b][0]))
    rows.append(mean_row)
    for name in labels:
        row = [f"<td>{esc(name)}</td>", num_cell(auc["positives"].get(name), 0)]
        for b in shown:
            r = branches[b]
            row.append(cell(b, r["auc"].get(name), r["ci_lo"].get(name), r["ci_hi"].get(name), name))
        for b in with_ece:
            row.append(num_cell(eces[b][1].get(name)))
        rows.append(row)
    untrained = [b for b in BRANCHES if not branches.get(b, {}).get("trained")]
    note = (f"<p class=\"note\">Not trained by this checkpoint's stage, so not scored: {esc(', '.join(untrained))}.</p>"
            if untrained else "")
    return table(header, rows, raw=True, attrs='id="auc-table"') + note


def _split_text(auc: dict[str, Any]) -> str:
    s = auc["split"]
    parts = [f"{auc['n_images']} images of the {s['name']} split"
             + (f" ({s['patients']} patients)" if s.get("patients") else "") + f", from {s['source']}."]
    check = s.get("training_split") or {}
    if check.get("problems"):
        parts.append(f"Evaluated with --allow-other-split although {'; and '.join(check['problems'])}: "
                     f"not a held-out evaluation of this checkpoint.")
    parts += [f"{c[:1].upper()}{c[1:]}." for c in s.get("caveats", [])]
    if s.get("patient_wise") is False:
        parts.append(f"{s['patients_also_in_train']} of the patients also have images in the training split: "
                     f"the scores are optimistic.")
    elif s.get("patient_wise") is True:
        parts.append("No patient of this split has images in the training split.")
    if s["name"] == "val":
        parts.append("Validation numbers chose checkpoints and operating points; report the test split.")
    if auc.get("n_skipped"):
        parts.append(f"{auc['n_skipped']} images could not be read and are left out (skipped.csv).")
    bs = auc.get("bootstrap", {})
    if bs.get("n"):
        parts.append(f"Intervals: {100 * (1 - bs['alpha']):.0f} % percentile bootstrap, {bs['n']} resamples of "
                     f"{'whole patients' if bs['unit'] == 'patient' else 'images'} (seed {bs['seed']}), the same "
                     f"resamples for every branch.")
    return " ".join(parts)


def operating_points(auc: dict[str, Any]) -> str:
    ops = auc.get("operating_points_scored")
    out = []
    if ops:
        rows = [[f"<td>{esc(n)}</td>", num_cell(r.get("threshold")), num_cell(r.get("sensitivity")),
                 num_cell(r.get("specificity"))] for n, r in ops["classes"].items()]
        out.append(f"<p>At the checkpoint's operating points ({esc(ops['branch'])} branch), chosen on the validation "
                   f"split:</p>" + table(["finding", "threshold", "sensitivity", "specificity"], rows, raw=True,
                                         attrs='id="operating-points"'))
    else:
        out.append("<p>The checkpoint stores no operating points: no calls, so no sensitivity or specificity "
                   "(<code>agcnn evaluate --split val --write-operating-points</code> stores them).</p>")
    youden = auc.get("youden_operating_points")
    if youden:
        names = list(auc["labels"])
        rows = [[f"<td>{esc(n)}</td>", *(num_cell(youden[b].get(n)) for b in youden)] for n in names]
        out.append("<p>Youden operating points of this (validation) split:</p>"
                   + table(["finding", *youden], rows, raw=True))
    return "".join(out)


def sections(folder: Path, auc: dict[str, Any], *, cases: int = 2, data_root: str | None = None) -> list[tuple[str, str, str]]:
    from agcnn.pages.cases import KIND_NAMES, render_strips

    out = [("auc", "AUC per finding and branch",
            f"<p>{esc(_split_text(auc))}</p>{auc_table(auc)}<p class=\"note\">{esc(PAPER_NOTE)}</p>")]
    if (folder / "roc.png").is_file():
        out.append(("roc", "ROC curves", img(file_uri(folder / "roc.png"), "ROC curves per finding")))
    has_ece = any(calibration_error(r, list(auc["labels"]))[0] is not None for r in auc["branches"].values() if r.get("trained"))
    if (folder / "reliability.png").is_file() or has_ece:
        body = ""
        if (folder / "reliability.png").is_file():
            body += img(file_uri(folder / "reliability.png"), "reliability diagrams")
        body += ("<p class=\"note\">Expected calibration error (ECE) per branch and finding: the table above, "
                 "columns ECE.</p>" if has_ece else "")
        out.append(("calibration", "Calibration", body))
    out.append(("operating-points", "Operating points", operating_points(auc)))
    strips, note, how = render_strips(auc, folder, cases, data_root=data_root)
    body = []
    if how:
        body.append(f"<p>Calls at {esc(how)}. Per finding the {cases} surest true positives and false positives "
                    f"(highest fusion probability) and false negatives (lowest); each film as the model saw it, its "
                    f"attended box (green) and the fusion class activation map of the finding (colour, one scale per "
                    f"strip).</p>")
    if note:
        body.append(f"<p class=\"note\">{esc(note)}</p>")
    for f, (threshold, uri, listed) in strips.items():
        items = "; ".join(f"{KIND_NAMES[k]} {p} ({prob:.3f})" for k, p, prob in listed)
        body.append(f"<h3>{esc(f)} <span class=\"ci\">called at p &ge; {esc(f'{threshold:.3g}')}</span></h3>"
                    f"{img(uri, f'cases of {f}')}<p class=\"note\">{esc(items)}</p>")
    if cases > 0:
        out.append(("cases", "Most confident calls, right and wrong", "".join(body)))
    return out


def settings(auc: dict[str, Any]) -> dict[str, Any]:
    """What the run was asked to do and how it ran."""
    return {
        "checkpoint": auc.get("checkpoint"), "checkpoint sha256": auc.get("checkpoint_sha256"),
        "stage": auc.get("stage") or "fusion", "split": auc["split"].get("name"), "images": auc.get("n_images"),
        "device": auc.get("device"), "inference precision": auc.get("inference_precision"),
        "bootstrap": auc.get("bootstrap"), "data": auc.get("data"), "agcnn": auc.get("agcnn_version"),
        "seconds": auc.get("seconds"),
    }


def summary_line(auc: dict[str, Any]) -> str:
    b = auc["branches"]
    return ", ".join(f"{k} {num(b[k].get('mean_auc'))}" for k in BRANCHES if b.get(k, {}).get("trained"))
