"""The sections of a batch-inference page, from ``predictions.csv`` and ``manifest.json``.

A run may hold 10,000 files or more, so the long parts are bounded: the table lists every file
once (path, status, the findings called, the three most probable) and a small inline script
shows it a page at a time and filters it by finding or status; the gallery embeds shrunken
copies of at most ``gallery`` overlays (``predict --overlays``), the surest positive calls first,
also paged. Every other overlay stays a link to its file in ``overlays/``.

Identifying columns (patient name, ID, ...) are shown only when the run wrote them
(``--include-identifiers``); the DICOM UIDs are never shown.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from agcnn.pages.html import esc, file_uri, num, table

PAGE_ROWS = 100
GALLERY_PAGE = 12
# The predict run's identifying columns (agcnn.predict.records.IDENTIFIER_COLUMNS; not imported:
# the commands sit above this module).
IDENTIFIER_COLUMNS = ("PatientID", "AccessionNumber", "StudyDate")


def read_predictions(folder: Path, labels: list[str]) -> pd.DataFrame:
    # Paths and reasons stay text: a file named "1.0" or "NA" is still that name.
    dtypes = {"path": str, "status": str, "reason": str, "notes": str}
    table = pd.read_csv(folder / "predictions.csv", dtype=dtypes, keep_default_na=False, na_values={n: [""] for n in labels})
    for c in labels:
        if c in table:
            table[c] = pd.to_numeric(table[c], errors="coerce")
    return table


def counts(table: pd.DataFrame) -> tuple[Counter, Counter]:
    """Files per status, and per ``(status, reason code)`` for the files that were not predicted."""
    by_status = Counter(table["status"])
    by_reason = Counter((s, r.split(":", 1)[0].strip() or "(none)")
                        for s, r in zip(table["status"], table["reason"]) if s != "ok")
    return by_status, by_reason


def positive_calls(table: pd.DataFrame, labels: list[str]) -> dict[str, int] | None:
    """Files called positive per finding (``call_*`` columns), None when the run made no calls."""
    cols = [f"call_{n}" for n in labels]
    if not all(c in table for c in cols):
        return None
    return {n: int((pd.to_numeric(table[f"call_{n}"], errors="coerce") == 1).sum()) for n in labels}


def sections(folder: Path, manifest: dict[str, Any], *, gallery: int = 60, href: str = "") -> list[tuple[str, str, str]]:
    """``href``: the folder's path relative to the page (a demo page sits one folder above)."""
    labels = list(manifest.get("labels") or [])
    preds = read_predictions(folder, labels)
    by_status, by_reason = counts(preds)
    n = len(preds)
    out = []

    rows = [[f"<td>{esc(s)}</td>", f'<td class="n" data-status="{esc(s)}">{by_status.get(s, 0)}</td>']
            for s in ("ok", "skipped", "failed") if s in by_status or s == "ok"]
    rows += [[f"<td>{esc(s)}</td>", f'<td class="n" data-status="{esc(s)}">{c}</td>']
             for s, c in sorted(by_status.items()) if s not in ("ok", "skipped", "failed")]
    body = [f"<p>{n} files listed under the input folder; {by_status.get('ok', 0)} predicted.</p>",
            table(["status", "files"], rows, raw=True, attrs='id="status-counts"')]
    if by_reason:
        rrows = [[f"<td>{esc(s)}</td>", f"<td>{esc(r)}</td>", f'<td class="n" data-reason="{esc(r)}">{c}</td>']
                 for (s, r), c in sorted(by_reason.items())]
        body.append("<h3>Not predicted, by reason</h3>" + table(["status", "reason", "files"], rrows, raw=True,
                                                                 attrs='id="reason-counts"'))
        # Every file that was not predicted, with its full reason: out of scope, not frontal, failed.
        listed = preds[preds["status"] != "ok"]
        body.append("<h3>The files not predicted</h3>" + table(
            ["path", "status", "reason"], [[p, s, r] for p, s, r in zip(listed["path"], listed["status"], listed["reason"])],
            attrs='id="not-predicted"'))
    out.append(("counts", "Files by status", "".join(body)))

    calls = positive_calls(preds, labels)
    ok = preds[preds["status"] == "ok"]
    if calls is not None:
        ops = (manifest.get("operating_points") or {}).get("fusion") or [None] * len(labels)
        crow = [[f"<td>{esc(f)}</td>", f'<td class="n" data-finding="{esc(f)}">{calls[f]}</td>',
                 f'<td class="n">{esc(num(t))}</td>'] for f, t in zip(labels, ops)]
        out.append(("calls", "Positive calls per finding",
                    f"<p>Files called positive at the checkpoint's fusion operating points, of {len(ok)} predicted.</p>"
                    + table(["finding", "files called positive", "operating point"], crow, raw=True, attrs='id="calls"')))
    else:
        out.append(("calls", "Positive calls per finding",
                    "<p>The checkpoint stores no operating points, so the run made no calls; the table below shows "
                    "the most probable findings of each file.</p>"))

    overlays = folder / "overlays"
    out.append(("files", "Every file", _file_table(preds, labels, calls is not None, overlays, manifest, href)))
    if overlays.is_dir():
        out.append(("gallery", "Overlays", _gallery(ok, labels, calls is not None, overlays, gallery)))
    return out


def _tags(row, labels: list[str], with_calls: bool) -> list[str]:
    tags = [f"status:{row['status']}"]
    if with_calls:
        tags += [f"call:{n}" for n in labels if str(row.get(f"call_{n}", "")) in ("1", "1.0")]
    return tags


def _file_table(table: pd.DataFrame, labels: list[str], with_calls: bool, overlays: Path, manifest: dict[str, Any],
                href: str = "") -> str:
    ids = [c for c in IDENTIFIER_COLUMNS if c in table and (manifest.get("arguments") or {}).get("include_identifiers")]
    probs = table[labels].to_numpy(dtype=float) if labels else None
    has_overlays = overlays.is_dir()
    opts = ['<option value="">every file</option>'] + [f'<option value="status:{esc(s)}">status {esc(s)}</option>'
                                                         for s in sorted(set(table["status"]))]
    if with_calls:
        opts += [f'<option value="call:{esc(n)}">called positive: {esc(n)}</option>' for n in labels]
    header = ["path", *ids, "status", "called positive", "most probable", "reason / notes"] + (["overlay"] if has_overlays else [])
    body = []
    for i, row in enumerate(table.to_dict("records")):
        called, top = "", ""
        if row["status"] == "ok" and probs is not None:
            p = probs[i]
            if with_calls:
                called = ", ".join(f"{n} {p[j]:.3f}" for j, n in enumerate(labels)
                                   if str(row.get(f"call_{n}", "")) in ("1", "1.0"))
            order = sorted(range(len(labels)), key=lambda j: -(p[j] if p[j] == p[j] else -1))[:3]
            top = ", ".join(f"{labels[j]} {p[j]:.3f}" for j in order)
        reason = "; ".join(x for x in (row.get("reason") or "", row.get("notes") or "") if x)
        cells = [f"<td>{esc(row['path'])}</td>", *(f"<td>{esc(row.get(c))}</td>" for c in ids),
                 f"<td>{esc(row['status'])}</td>", f"<td>{esc(called)}</td>", f"<td>{esc(top)}</td>", f"<td>{esc(reason)}</td>"]
        if has_overlays:
            pic = overlays / (row["path"] + ".png")
            cells.append(f'<td><a href="{esc(href)}overlays/{esc(quote(row["path"]))}.png">picture</a></td>'
                         if row["status"] == "ok" and pic.is_file() else "<td></td>")
        tags = " ".join(_tags(row, labels, with_calls))
        body.append(f'<tr data-item data-key="{esc(row["path"])}" data-tags="{esc(tags)}">' + "".join(cells) + "</tr>")
    controls = ('<div class="controls"><label>show <select data-filter>' + "".join(opts) + "</select></label>"
                '<label>path contains <input data-search size="24"></label>'
                '<button data-step="-1">previous</button><button data-step="1">next</button><span data-info></span></div>')
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
    return (f'<div data-pager data-page-size="{PAGE_ROWS}">{controls}<table id="files">{head}<tbody>'
            + "".join(body) + "</tbody></table></div>")


def _gallery(ok: pd.DataFrame, labels: list[str], with_calls: bool, overlays: Path, limit: int) -> str:
    if limit <= 0:
        return "<p>Gallery left out (--gallery 0).</p>"
    probs = ok[labels].to_numpy(dtype=float)
    called = (ok[[f"call_{n}" for n in labels]].astype(str).isin(["1", "1.0"]).to_numpy() if with_calls
              else probs >= 1.0)
    # The surest positive calls first, then the most probable findings of the rest.
    score = [(-(max(p[c]) if c.any() else -1.0), -(max(p) if len(p) else 0)) for p, c in zip(probs, called)]
    order = sorted(range(len(ok)), key=lambda i: score[i])
    paths = ok["path"].tolist()
    figures, n_with = [], 0
    for i in order:
        pic = overlays / (paths[i] + ".png")
        if not pic.is_file():
            continue
        n_with += 1
        if len(figures) >= limit:
            continue
        cap = ", ".join(f"{labels[j]} {probs[i][j]:.2f}" for j in range(len(labels)) if called[i][j]) or "no finding called"
        tags = " ".join(f"call:{labels[j]}" for j in range(len(labels)) if called[i][j])
        figures.append(f'<figure data-item data-key="{esc(paths[i])}" data-tags="{esc(tags)}">'
                       f'<img loading="lazy" alt="overlay of {esc(paths[i])}" src="{esc(file_uri(pic, max_width=480, jpeg=True))}">'
                       f"<figcaption>{esc(paths[i])}: {esc(cap)}</figcaption></figure>")
    opts = ['<option value="">every picture</option>'] + (
        [f'<option value="call:{esc(n)}">called positive: {esc(n)}</option>' for n in labels] if with_calls else [])
    note = (f"<p>{len(figures)} of the {n_with} overlays, surest positive calls first, shrunk to 480 px; each file's "
            f"full overlay is linked from the table above (the <code>overlays/</code> folder beside this page).</p>")
    controls = ('<div class="controls"><label>show <select data-filter>' + "".join(opts) + "</select></label>"
                '<button data-step="-1">previous</button><button data-step="1">next</button><span data-info></span></div>')
    return (f'{note}<div data-pager data-page-size="{GALLERY_PAGE}">{controls}<div class="gallery">'
            + "".join(figures) + "</div></div>")


def settings(manifest: dict[str, Any]) -> dict[str, Any]:
    args = dict(manifest.get("arguments") or {})
    return {"checkpoint": (manifest.get("checkpoint") or {}).get("path"),
            "checkpoint sha256": (manifest.get("checkpoint") or {}).get("sha256"), "arguments": args,
            "scope": manifest.get("scope"), "device": manifest.get("device"),
            "inference precision": manifest.get("inference_precision"), "versions": manifest.get("versions"),
            "started": manifest.get("started"), "finished": manifest.get("finished"),
            "complete": manifest.get("complete"), "files per second": manifest.get("files_per_second")}
