"""The sections of a localisation page, from what ``agcnn localize`` wrote (``localization.json``,
``localization_cases.png``): accuracy at T(IoBB) and T(IoU) beside Wang et al. 2017, and the best
and worst cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agcnn.pages.html import esc, file_uri, img, num_cell, table

METHOD_NAMES = {"attended": "attended box (local branch crop)", "global_cam": "global branch CAM",
                "local_cam": "local branch CAM", "fusion_cam": "fusion CAM"}
THRESHOLDS = (0.1, 0.25, 0.5, 0.75)


def _value(summary: list[dict[str, Any]], method: str, finding: str, metric: str, t: float | None) -> dict | None:
    for r in summary:
        if r["method"] == method and r["finding"] == finding and r["metric"] == metric and (
                t is None or (r["threshold"] is not None and abs(r["threshold"] - t) < 1e-9)):
            return r
    return None


def _cell(r: dict | None) -> str:
    if r is None or r.get("value") is None:
        return '<td class="n">–</td>'
    ci = (f' <span class="ci">[{r["ci_low"]:.2f}, {r["ci_high"]:.2f}]</span>' if r.get("ci_low") is not None else "")
    return num_cell(r["value"], 2, extra=ci)


def sections(folder: Path, loc: dict[str, Any]) -> list[tuple[str, str, str]]:
    summary = loc.get("summary") or []
    wang = loc.get("wang2017_resnet50_iobb_0.5") or {}
    methods = [m for m in (loc.get("settings") or {}).get("methods", []) if any(r["method"] == m for r in summary)]
    c = loc.get("counts") or {}
    oov = sum((c.get("out_of_view") or {}).values())
    intro = (f"<p>{esc(c.get('boxes', 'n/a'))} ground-truth boxes on {esc(c.get('images', 'n/a'))} images; not scored: "
             f"{len(c.get('missing_images') or [])} images not found, {len(c.get('unreadable_images') or [])} unreadable, "
             f"{oov} boxes outside the field of view. Accuracy: the share of boxes whose overlap with the predicted "
             f"box reaches T; IoBB is the intersection over the predicted box's area (Wang et al. 2017, Sec. 4.2). "
             f"In brackets: 95 % bootstrap interval over boxes.</p>")
    findings = [f for f in wang if any(r["finding"] == f for r in summary)]
    rows = [["<td>Wang et al. 2017, ResNet-50</td>", *(num_cell(wang[f], 2) for f in findings), '<td class="n">–</td>']]
    for m in methods:
        rows.append([f"<td>{esc(METHOD_NAMES.get(m, m))}</td>",
                     *(_cell(_value(summary, m, f, "iobb", 0.5)) for f in findings), _cell(_value(summary, m, "all", "iobb", 0.5))])
    body = [intro, "<h3>Accuracy at T(IoBB) = 0.5, beside Wang et al. 2017</h3>",
            table(["", *findings, "all"], rows, raw=True, attrs='id="wang"')]
    all_findings = sorted({r["finding"] for r in summary if r["finding"] != "all"}) + ["all"]
    for m in methods:
        trows = []
        for metric, label in (("iobb", "T(IoBB)"), ("iou", "T(IoU)")):
            for t in THRESHOLDS:
                trows.append([f"<td>{label} = {t}</td>", *(_cell(_value(summary, m, f, metric, t)) for f in all_findings)])
        trows.append(["<td>centre in box</td>", *(_cell(_value(summary, m, f, "centre_in_box", None)) for f in all_findings)])
        body.append(f"<h3>{esc(METHOD_NAMES.get(m, m))}</h3>" + table(["", *all_findings], trows, raw=True))
    out = [("localization", "Localisation against ground-truth boxes", "".join(body))]
    if (folder / "localization_cases.png").is_file():
        out.append(("cases", "Best and worst cases", img(file_uri(folder / "localization_cases.png"), "best and worst cases")))
    return out


def settings(loc: dict[str, Any]) -> dict[str, Any]:
    return dict(loc.get("settings") or {})
