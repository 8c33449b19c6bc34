"""What the report pages say, read back from their HTML (no browser: tests/pages/test_pages_browser.py)."""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from agcnn.cli import main
from agcnn.errors import UsageError
from agcnn.pages import detect_kind, write_report
from agcnn.pages.html import CSP, esc, page

from markup import MARKUP_NAME

# Anything a page could fetch: a URL in src / href / url(), an @import, a <link> or a frame.
EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|//|ftp:|file:)|url\(\s*['"]?(?!data:)|@import|<link\b|<iframe\b|<object\b|<embed\b""",
                      re.IGNORECASE)


class Cells(HTMLParser):
    """Every element's attributes and text, enough to find a cell by its data-* attributes."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.stack: list[int] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), []))
        self._in_script = tag == "script"
        if tag not in ("img", "meta", "input", "br"):
            self.stack.append(len(self.elements) - 1)

    def handle_endtag(self, tag):
        self._in_script = False
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)
        for i in self.stack:
            self.elements[i][2].append(data)

    def find(self, **attrs) -> list[tuple[str, dict[str, str], str]]:
        return [(t, a, "".join(x)) for t, a, x in self.elements if all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def parse(path: Path) -> Cells:
    p = Cells()
    p.feed(path.read_text())
    return p


def test_escape_covers_markup_and_quotes():
    assert esc('<img src=x onerror="a">&') == "&lt;img src=x onerror=&quot;a&quot;&gt;&amp;"
    doc = page("<t>", "s & t", [("a", "<h>", "<p>body</p>")], kind="evaluate")
    assert "<title>&lt;t&gt;</title>" in doc and "<h2>&lt;h&gt;</h2>" in doc
    assert f'content="{CSP}"' in doc and not EXTERNAL.search(doc)


def test_kind_is_read_from_the_files(evaluate_dir, predict_dir, localize_dir, demo_dir, tmp_path):
    assert [detect_kind(d) for d in (evaluate_dir, predict_dir, localize_dir, demo_dir)] == [
        "evaluate", "predict", "localize", "demo"]
    with pytest.raises(UsageError, match="auc.json"):
        detect_kind(tmp_path)


def test_evaluate_page_shows_the_numbers_of_auc_json(evaluate_dir, tmp_path):
    folder = tmp_path / "ev"
    shutil.copytree(evaluate_dir, folder)
    auc = json.loads((folder / "auc.json").read_text())
    assert main(["report", str(folder), "--cases", "1"]) == 0
    cells = parse(folder / "report.html")
    for b in ("global", "local", "fusion"):
        r = auc["branches"][b]
        (mean,) = cells.find(data_branch=b, data_key="mean")
        assert float(mean[1]["data-value"]) == pytest.approx(r["mean_auc"], abs=1e-12)
        assert f"{r['mean_auc']:.3f}" in mean[2] and f"{r['mean_ci'][0]:.3f}" in mean[2]
        for name, v in r["auc"].items():
            (cell,) = cells.find(data_branch=b, data_key=name)
            assert cell[1]["data-value"] == ("" if v is None else repr(float(v)))
    ops = auc["operating_points_scored"]["classes"]
    table = [c for c in cells.find(id="operating-points")]
    assert table and all(f"{r['threshold']:.3f}" in table[0][2] for r in ops.values() if r["threshold"] is not None)
    text = (folder / "report.html").read_text()
    # The cases come from the checkpoint: one strip per finding with a positive image.
    positives = [n for n, c in auc["positives"].items() if c]
    strips = [a for t, a, _ in cells.elements if t == "img" and a.get("alt", "").startswith("cases of ")]
    assert {a["alt"][len("cases of "):] for a in strips} <= set(positives) and strips
    assert "Model card" in text and "TRIPOD+AI" in text and "Research use only, not for diagnosis" in text
    # Evaluate records the calibration error and draws the reliability diagrams: both on the page.
    ece = auc["branches"]["fusion"]["ece"]["width"]
    assert 'id="calibration"' in text and 'alt="reliability diagrams"' in text
    assert f'data-value="{ece["mean"]!r}"' in text
    assert not EXTERNAL.search(text)


def test_calibration_is_shown_when_evaluate_records_it(evaluate_dir, tmp_path):
    from matplotlib.figure import Figure

    folder = tmp_path / "ev"
    shutil.copytree(evaluate_dir, folder)
    auc = json.loads((folder / "auc.json").read_text())
    auc["branches"]["fusion"]["ece"] = 0.0421
    auc["branches"]["fusion"]["ece_per_class"] = {"Nodule": 0.1234}
    (folder / "auc.json").write_text(json.dumps(auc))
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    fig.savefig(folder / "reliability.png")
    write_report(folder, cases=0)
    text = (folder / "report.html").read_text()
    assert 'id="calibration"' in text and 'alt="reliability diagrams"' in text
    assert 'data-value="0.0421"' in text and 'data-value="0.1234"' in text


def test_predict_page_counts_equal_predictions_csv_and_lists_the_files_not_predicted(predict_dir, tmp_path):
    folder = tmp_path / "pr"
    shutil.copytree(predict_dir, folder)
    rows = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    assert main(["report", str(folder)]) == 0
    cells = parse(folder / "report.html")
    text = (folder / "report.html").read_text()
    for status, n in rows["status"].value_counts().items():
        (cell,) = cells.find(data_status=status)
        assert int(cell[2]) == n
    skipped = rows[rows["status"] != "ok"]
    assert "skull.dcm" in set(skipped["path"]) and "page.dcm" in set(skipped["path"])
    (listed,) = cells.find(id="not-predicted")
    for path, reason in zip(skipped["path"], skipped["reason"]):
        assert path in listed[2] and reason in listed[2]
    assert any(r.startswith("out_of_scope") for r in skipped["reason"])
    (cell,) = cells.find(data_reason="out_of_scope")
    assert int(cell[2]) == sum(r.startswith("out_of_scope") for r in skipped["reason"])
    for name in json.loads((folder / "manifest.json").read_text())["labels"]:
        (cell,) = cells.find(data_finding=name)
        assert int(cell[2]) == int((rows[f"call_{name}"] == "1").sum())
    # Every file once in the table, its name as text: the markup in a file name is escaped.
    items = cells.find(id="files")
    assert len([e for e in cells.elements if e[0] == "tr" and "data-item" in e[1]]) == len(rows)
    assert MARKUP_NAME in items[0][2] and "<img src=x" not in text and htmllib.escape(MARKUP_NAME) in text
    # The gallery embeds the overlays; UIDs never reach the page.
    assert len([a for t, a, _ in cells.elements if t == "figure" and "data-item" in a]) == (rows["status"] == "ok").sum()
    for uid in rows["study_instance_uid"]:
        assert not uid or uid not in text
    assert not EXTERNAL.search(text)


def test_gallery_is_capped(predict_dir, tmp_path):
    folder = tmp_path / "pr"
    shutil.copytree(predict_dir, folder)
    write_report(folder, gallery=2)
    cells = parse(folder / "report.html")
    assert len([a for t, a, _ in cells.elements if t == "figure" and "data-item" in a]) == 2


def test_localize_page_sets_wang_beside_the_run(localize_dir, tmp_path):
    folder = tmp_path / "lo"
    shutil.copytree(localize_dir, folder)
    loc = json.loads((folder / "localization.json").read_text())
    write_report(folder)
    cells = parse(folder / "report.html")
    (wang,) = cells.find(id="wang")
    for f, v in loc["wang2017_resnet50_iobb_0.5"].items():
        if f in wang[2]:
            assert f"{v:.2f}" in wang[2]
    row = next(r for r in loc["summary"] if r["method"] == "attended" and r["finding"] == "all" and r["metric"] == "iobb"
               and r["threshold"] == 0.5)
    assert f"{row['value']:.2f}" in wang[2]
    assert 'alt="best and worst cases"' in (folder / "report.html").read_text()


def test_card_section_notes_a_checkpoint_that_moved(evaluate_dir, tmp_path):
    folder = tmp_path / "ev"
    shutil.copytree(evaluate_dir, folder)
    auc = json.loads((folder / "auc.json").read_text())
    auc["checkpoint"] = str(tmp_path / "gone" / "<best>.pt")
    (folder / "auc.json").write_text(json.dumps(auc))
    write_report(folder)
    text = (folder / "report.html").read_text()
    assert "no longer at its recorded path" in text and "&lt;best&gt;.pt" in text
    assert "is not at its recorded path, so the cases cannot be drawn" in text


def test_report_of_a_folder_of_nothing_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "auc.json" in capsys.readouterr().err


def test_cases_are_the_surest_calls_right_and_wrong():
    from agcnn.pages.cases import choose_cases, thresholds_of

    preds = pd.DataFrame({"Nodule": [1, 1, 0, 0, 1, None, 1], "p_fusion_Nodule": [0.9, 0.6, 0.8, 0.3, 0.1, 0.99, 0.4]})
    assert choose_cases(preds, "Nodule", 0.5, 1) == {"TP": [0], "FP": [2], "FN": [4]}
    # A missing label is neither right nor wrong; the lowest-scored positive is the surest miss.
    assert choose_cases(preds, "Nodule", 0.5, 2) == {"TP": [0, 1], "FP": [2], "FN": [4, 6]}
    assert choose_cases(preds, "Nodule", 0.95, 3) == {"TP": [], "FP": [], "FN": [4, 6, 1]}
    assert thresholds_of({}, ["Nodule"]) == ({"Nodule": 0.5}, "probability 0.5 (the checkpoint stores no operating points)")
    scored = {"operating_points_scored": {"branch": "fusion", "classes": {"Nodule": {"threshold": 0.3}}}}
    assert thresholds_of(scored, ["Nodule"])[0] == {"Nodule": 0.3}


def test_evaluate_writes_its_page_unless_asked_not_to(phantom_checkpoint, tmp_path, capsys):
    args = ["evaluate", "--checkpoint", str(phantom_checkpoint), "--split", "test", "--bootstrap", "0",
            "--num-workers", "0", "--device", "cpu", "--no-roc"]
    assert main([*args, "--out", str(tmp_path / "with")]) == 0
    assert f"{tmp_path / 'with'}/report.html" in capsys.readouterr().out
    auc = json.loads((tmp_path / "with" / "auc.json").read_text())
    (mean,) = parse(tmp_path / "with" / "report.html").find(data_branch="fusion", data_key="mean")
    assert float(mean[1]["data-value"]) == auc["branches"]["fusion"]["mean_auc"]
    assert main([*args, "--out", str(tmp_path / "without"), "--no-html"]) == 0
    assert not (tmp_path / "without" / "report.html").exists() and (tmp_path / "without" / "auc.json").is_file()


@pytest.mark.parametrize("ece", [{"mean": 0.05, "per_class": {"Mass": 0.07}}, {"mean": 0.05, "Mass": 0.07}])
def test_calibration_error_in_either_shape(ece):
    from agcnn.pages.evaluate import calibration_error

    assert calibration_error({"ece": ece}, ["Mass", "Nodule"]) == (0.05, {"Mass": 0.07})
    assert calibration_error({"ece": 0.05, "ece_per_class": {"Mass": 0.07}}, ["Mass"]) == (0.05, {"Mass": 0.07})
    assert calibration_error({}, ["Mass"]) == (None, {})


def test_cases_of_a_table_given_by_file_are_read_from_its_folder(phantom_checkpoint, tmp_path):
    # evaluate --split FILE.csv reads relative paths from the file's folder, not data.root.
    from agcnn.checkpoint import load_checkpoint
    from agcnn.evaluate import evaluate_checkpoint

    root = Path(load_checkpoint(phantom_checkpoint)["config"]["data"]["root"])
    table = pd.read_csv(root / "labels.csv").head(12)
    (tmp_path / "mine" / "films").mkdir(parents=True)
    for i, p in enumerate(table["path"]):
        shutil.copyfile(root / p, tmp_path / "mine" / "films" / f"{i}.png")
    table["path"] = [f"films/{i}.png" for i in range(len(table))]  # no such file under data.root
    table.to_csv(tmp_path / "mine" / "table.csv", index=False)
    out = tmp_path / "ev"
    evaluate_checkpoint(phantom_checkpoint, split=str(tmp_path / "mine" / "table.csv"), out_dir=out, device="cpu",
                        num_workers=0, bootstrap=0, roc=False, html=False)
    write_report(out, cases=1)
    text = (out / "report.html").read_text()
    assert 'alt="cases of ' in text and "could not be drawn" not in text


def test_calibration_error_as_evaluate_writes_it(evaluate_dir, tmp_path):
    from agcnn.pages.evaluate import calibration_error

    ece = {"bins": 10, "width": {"ece": {"Mass": 0.07, "Nodule": None}, "mean": 0.05, "mean_ci": [0.03, 0.08],
                                 "lo": {}, "hi": {}},
           "mass": {"ece": {"Mass": 0.09}, "mean": 0.06}}
    assert calibration_error({"ece": ece}, ["Mass", "Nodule"]) == (0.05, {"Mass": 0.07})
    folder = tmp_path / "ev"
    shutil.copytree(evaluate_dir, folder)
    auc = json.loads((folder / "auc.json").read_text())
    auc["branches"]["fusion"]["ece"] = ece
    (folder / "auc.json").write_text(json.dumps(auc))
    write_report(folder, cases=0)
    text = (folder / "report.html").read_text()
    assert "fusion ECE (equal width)" in text and 'data-value="0.07"' in text and 'id="calibration"' in text
