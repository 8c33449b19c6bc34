"""Each kind of report page in a real browser: headless Chromium opens it offline, its scripts run,
its numbers are those of the run's files, it requests nothing from the network (Chromium's net
log), and a screenshot of it is kept in ``artifacts/`` (``AGCNN_ARTIFACTS`` elsewhere) for CI.

Skipped, saying so, where Chromium is not installed (``.ci/run`` installs the Debian package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from agcnn.pages import write_report
from agcnn.pages.html import CSP

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "chromium_page.py"
ARTIFACTS = Path(os.environ.get("AGCNN_ARTIFACTS", REPO / "artifacts"))


def _runner():
    spec = importlib.util.spec_from_file_location("chromium_page", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


chromium_page = _runner()
pytestmark = pytest.mark.skipif(chromium_page.find_chromium() is None,
                                reason="chromium is not installed (apt-get install chromium); the page tests need a browser")


def _open(page: Path, name: str):
    opened = chromium_page.open_page(page, screenshot=ARTIFACTS / f"report-{name}.png")
    assert opened.screenshot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    assert opened.requests == [], f"the page asked the network for {opened.requests}"
    assert "Refused to" not in opened.stderr, opened.stderr[-2000:]  # a CSP violation: something was blocked
    assert "Uncaught" not in opened.stderr, opened.stderr[-2000:]  # a script error
    return opened


def _data_value(dom: str, **attrs: str) -> str:
    pattern = "".join(rf'(?=[^>]*\b{k.replace("_", "-")}="{re.escape(v)}")' for k, v in attrs.items())
    m = re.search(rf"<td{pattern}[^>]*\bdata-value=\"([^\"]*)\"[^>]*>([^<]*)", dom)
    assert m, f"no cell {attrs} on the page"
    return m.group(1), m.group(2)


def test_the_net_log_check_sees_a_page_that_fetches(tmp_path):
    # The detector itself: a page with remote pictures and scripts is caught; the same page under
    # the reports' Content-Security-Policy fetches nothing.
    body = '<img src="http://127.0.0.1:9/x.png"><script src="https://example.invalid/a.js"></script>'
    (tmp_path / "leak.html").write_text(f"<!DOCTYPE html><html><body>{body}</body></html>")
    urls = {r["url"] for r in chromium_page.open_page(tmp_path / "leak.html").requests}
    assert urls == {"http://127.0.0.1:9/x.png", "https://example.invalid/a.js"}
    (tmp_path / "csp.html").write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                                       f'content="{CSP}"></head><body>{body}</body></html>')
    assert chromium_page.open_page(tmp_path / "csp.html").requests == []


def test_evaluate_page_in_chromium(evaluate_dir, tmp_path):
    folder = tmp_path / "evaluate"
    shutil.copytree(evaluate_dir, folder)
    page = write_report(folder, cases=1)
    dom = _open(page, "evaluate").dom
    auc = json.loads((folder / "auc.json").read_text())
    fusion = auc["branches"]["fusion"]
    value, text = _data_value(dom, data_branch="fusion", data_key="mean")
    assert float(value) == fusion["mean_auc"] and text.strip() == f"{fusion['mean_auc']:.3f}"
    for name, v in fusion["auc"].items():
        value, _ = _data_value(dom, data_branch="fusion", data_key=name)
        assert value == ("" if v is None else repr(float(v)))
    assert 'alt="ROC curves per finding"' in dom and "Model card" in dom
    # Printable: the print style applies and the PDF holds the pictures (far more than text alone).
    pdf = chromium_page.print_pdf(page, ARTIFACTS / "report-evaluate.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 50_000 and data.count(b"/Type /Page") + data.count(b"/Type/Page") >= 2


def test_predict_page_in_chromium_lists_the_out_of_scope_files(predict_dir, tmp_path):
    folder = tmp_path / "predict"
    shutil.copytree(predict_dir, folder)
    page = write_report(folder)
    dom = _open(page, "predict").dom
    rows = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    for status, n in rows["status"].value_counts().items():
        assert re.search(rf'data-status="{status}">{n}<', dom)
    out_of_scope = rows[rows["reason"].str.startswith("out_of_scope")]
    assert len(out_of_scope) == 1
    listed = dom[dom.index('id="not-predicted"'):]
    assert "skull.dcm" in listed[: listed.index("</table>")]
    # The paging script ran: it counts the rows it shows.
    assert f"{len(rows)} of {len(rows)} shown; page 1 of 1" in dom


def test_localize_page_in_chromium(localize_dir, tmp_path):
    folder = tmp_path / "localize"
    shutil.copytree(localize_dir, folder)
    dom = _open(write_report(folder), "localize").dom
    assert 'id="wang"' in dom and "Wang et al. 2017" in dom


def test_demo_page_in_chromium(demo_dir, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(demo_dir, folder)
    page = write_report(folder, cases=0, notes=["AG-CNN demo: test split"])
    dom = _open(page, "demo").dom
    auc = json.loads((folder / "evaluation" / "auc.json").read_text())
    value, _ = _data_value(dom, data_branch="fusion", data_key="mean")
    assert float(value) == auc["branches"]["fusion"]["mean_auc"]
    assert 'id="predict-counts"' in dom and "AG-CNN demo: test split" in dom
