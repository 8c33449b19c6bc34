"""``agcnn report``: one self-contained HTML page per run folder, ``DIR/report.html``.

The kind of folder is read from the files in it (:func:`detect_kind`):

* ``evaluate`` (``auc.json``): AUC per finding with intervals, global / local / fusion side by
  side; ROC curves; reliability diagrams and calibration error where recorded; operating points
  with sensitivity and specificity; per finding the surest true positives, false positives and
  false negatives, drawn with their attended box and fusion map (:mod:`agcnn.pages.cases`);
* ``predict`` (``predictions.csv`` and ``manifest.json``): files by status and reason (every
  file not predicted listed with its reason), positive calls per finding, every file in a
  paged table filtered by finding, a gallery of the overlays;
* ``localize`` (``localization.json``): accuracy at T(IoBB) / T(IoU) beside Wang et al. 2017,
  best and worst cases;
* ``demo`` (an ``agcnn demo`` folder): its evaluation and predictions on one page.

Every page ends with the checkpoint's model card (:mod:`agcnn.card`) and the run's settings.
The page is built by :mod:`agcnn.pages.html`: pictures embedded, style and script inline, a
Content-Security-Policy that forbids any other source, every string escaped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agcnn.errors import UsageError

log = logging.getLogger(__name__)

KINDS = ("evaluate", "predict", "localize", "demo")
REPORT_NAME = "report.html"


def detect_kind(folder: Path) -> str:
    """Which command wrote ``folder``, from the files it holds."""
    if (folder / "evaluation" / "auc.json").is_file() and (folder / "run").is_dir():
        return "demo"
    if (folder / "auc.json").is_file():
        return "evaluate"
    if (folder / "localization.json").is_file():
        return "localize"
    if (folder / "predictions.csv").is_file() and (folder / "manifest.json").is_file():
        return "predict"
    raise UsageError(
        f"{str(folder)!r} is not the output of agcnn evaluate (auc.json), predict (predictions.csv and "
        f"manifest.json), localize (localization.json) or demo (evaluation/ and run/); pass such a folder"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {str(path)!r} ({e}); rerun the command that wrote it") from None


def card_section(checkpoint: str | None, sha256: str | None, evaluation: dict[str, Any] | None = None) -> str:
    """The model card of the run's checkpoint as HTML, or a note saying why there is none."""
    from agcnn.card import model_card
    from agcnn.checkpoint import load_checkpoint
    from agcnn.errors import CheckpointError
    from agcnn.fileio import sha256_file
    from agcnn.pages.html import card_html, esc

    if not checkpoint:
        return "<p>The run records no checkpoint.</p>"
    path = Path(checkpoint)
    if not path.is_file():
        return f"<p>The checkpoint {esc(checkpoint)} is no longer at its recorded path, so its card cannot be shown " \
               f"(<code>agcnn card CKPT</code> writes it from the file).</p>"
    try:
        ckpt = load_checkpoint(path)
    except (CheckpointError, ValueError) as e:
        return f"<p>The checkpoint {esc(checkpoint)} cannot be read: {esc(e)}</p>"
    now = sha256_file(path)
    warn = ""
    if sha256 and now != sha256:
        # Operating points written later change the file; the weights may be the same or not.
        warn = (f'<p class="warn">The file at {esc(checkpoint)} has changed since the run (sha256 {esc(now[:12])}..., the '
                f"run used {esc(sha256[:12])}...): this card describes the file as it is now.</p>")
    return warn + card_html(model_card(ckpt, path=str(path), sha256=now, evaluation=evaluation))


def settings_section(values: dict[str, Any]) -> str:
    from agcnn.pages.html import settings_table, table

    return table(["setting", "value"], settings_table(values), attrs='id="settings"')


def build_page(folder: Path, kind: str, *, cases: int = 2, gallery: int = 60, data_root: str | None = None,
               notes: Sequence[str] = ()) -> str:
    """The page's HTML for ``folder`` of ``kind``; ``notes``: lines shown first, as printed (the demo's summary)."""
    from agcnn.pages import evaluate as ev
    from agcnn.pages import localize as lo
    from agcnn.pages import predict as pr
    from agcnn.pages.html import esc, img, file_uri, page

    head: list[tuple[str, str, str]] = []
    if notes:
        head.append(("summary", "Summary", "<pre>" + esc("\n".join(notes)) + "</pre>"))
    if kind == "evaluate":
        auc = _read_json(folder / "auc.json")
        secs = ev.sections(folder, auc, cases=cases, data_root=data_root)
        title, sub = "agcnn evaluation", f"mean AUC {ev.summary_line(auc)}; {auc['split']['name']} split, {auc['n_images']} images"
        card = card_section(auc.get("checkpoint"), auc.get("checkpoint_sha256"), auc)
        settings = ev.settings(auc)
    elif kind == "predict":
        manifest = _read_json(folder / "manifest.json")
        secs = pr.sections(folder, manifest, gallery=gallery)
        title, sub = "agcnn batch inference", f"{folder.name}: {manifest.get('listing', {}).get('files', '?')} files"
        ck = manifest.get("checkpoint") or {}
        card = card_section(ck.get("path"), ck.get("sha256"))
        settings = pr.settings(manifest)
    elif kind == "localize":
        loc = _read_json(folder / "localization.json")
        secs = lo.sections(folder, loc)
        title, sub = "agcnn localisation", f"boxes {loc.get('settings', {}).get('boxes', '')}"
        card = card_section(loc.get("settings", {}).get("checkpoint"), None)
        settings = lo.settings(loc)
    elif kind == "demo":
        auc = _read_json(folder / "evaluation" / "auc.json")
        secs = [(a, h, b) for a, h, b in ev.sections(folder / "evaluation", auc, cases=cases, data_root=data_root)]
        if (folder / "overlay_changed_call.png").is_file():
            secs.append(("changed-call", "A call the local branch changed",
                         img(file_uri(folder / "overlay_changed_call.png"), "overlay of a changed call")))
        settings = {"evaluation": ev.settings(auc)}
        if (folder / "predictions" / "manifest.json").is_file():
            manifest = _read_json(folder / "predictions" / "manifest.json")
            secs += [(f"predict-{a}", f"Predictions: {h}", b)
                     for a, h, b in pr.sections(folder / "predictions", manifest, gallery=gallery, href="predictions/")]
            settings["prediction"] = pr.settings(manifest)
        title, sub = "agcnn demo", f"phantoms, test split of {auc['n_images']} images: mean AUC {ev.summary_line(auc)}"
        card = card_section(auc.get("checkpoint"), auc.get("checkpoint_sha256"), auc)
    else:
        raise UsageError(f"report kind {kind!r} is not one of {list(KINDS)}")
    secs = head + secs + [("model-card", "Model card", card), ("settings", "Settings of the run", settings_section(settings))]
    return page(title, sub, secs, kind=kind)


def write_report(folder: str | Path, *, kind: str | None = None, cases: int = 2, gallery: int = 60,
                 data_root: str | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``folder/report.html`` (atomically) and return its path."""
    from agcnn.fileio import atomic_write_bytes

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{str(folder)!r} is not a folder; pass the --out folder of agcnn evaluate, predict, localize or demo")
    kind = kind or detect_kind(folder)
    text = build_page(folder, kind, cases=cases, gallery=gallery, data_root=data_root, notes=notes)
    out = folder / REPORT_NAME
    atomic_write_bytes(out, lambda f: f.write(text.encode("utf-8")))
    return out


def write_report_or_warn(folder: str | Path) -> Path | None:
    """:func:`write_report` at the end of a command: the numbers are written, the page is their
    view, so a page that cannot be drawn costs a warning naming ``agcnn report``, not the run."""
    try:
        return write_report(folder)
    except Exception as e:  # noqa: BLE001 - whatever failed, the command's own files stand
        log.warning("report.html not written (%s: %s); `agcnn report %s` retries", type(e).__name__, e, folder)
        return None
