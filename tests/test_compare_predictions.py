"""scripts/compare_predictions.py: row matching, column selection, tolerance and exit codes."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_predictions.py"


@pytest.fixture(scope="module")
def cp():
    spec = importlib.util.spec_from_file_location("compare_predictions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


HEADER = ["path", "p_global_Mass", "Mass", "Hernia", "note"]


def test_identical_files_match(cp, tmp_path, capsys):
    rows = [["/a/x.dcm", 0.1, 0.2, 0.3, "foo"], ["/a/y.png", 0.4, 0.5, 0.6, "bar"]]
    a = write(tmp_path / "a.csv", HEADER, rows)
    b = write(tmp_path / "b.csv", HEADER, rows[::-1])  # row order does not matter
    assert cp.main([a, b]) == cp.EXIT_OK
    assert "2 rows x 3 columns" in capsys.readouterr().out


def test_within_and_beyond_tolerance(cp, tmp_path, capsys):
    a = write(tmp_path / "a.csv", HEADER, [["x", 0.1, 0.2, 0.3, "n"]])
    close = write(tmp_path / "b.csv", HEADER, [["x", 0.100004, 0.2, 0.3, "other text"]])
    far = write(tmp_path / "c.csv", HEADER, [["x", 0.1, 0.2001, 0.3, "n"]])
    assert cp.main([a, close]) == cp.EXIT_OK
    assert cp.main([a, far]) == cp.EXIT_DIFFERENT
    err = capsys.readouterr().err
    assert "'Mass'" in err and "> 1e-05" in err
    assert cp.main([a, far, "--atol", "1e-3"]) == cp.EXIT_OK


def test_missing_and_extra_rows_are_reported(cp, tmp_path, capsys):
    a = write(tmp_path / "a.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""], ["y", 0.1, 0.2, 0.3, ""]])
    b = write(tmp_path / "b.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""], ["z", 0.1, 0.2, 0.3, ""]])
    assert cp.main([a, b]) == cp.EXIT_DIFFERENT
    err = capsys.readouterr().err
    assert "'y': only in the reference" in err and "'z': only in the candidate" in err


def test_roots_are_stripped_from_keys(cp, tmp_path):
    a = write(tmp_path / "a.csv", HEADER, [["/data/xr/sub/x.dcm", 0.1, 0.2, 0.3, ""]])
    b = write(tmp_path / "b.csv", HEADER, [["/input/sub/x.dcm", 0.1, 0.2, 0.3, ""]])
    assert cp.main([a, b]) == cp.EXIT_DIFFERENT
    assert cp.main([a, b, "--ref-root", "/data/xr/", "--cand-root", "/input"]) == cp.EXIT_OK


def test_column_selection(cp):
    assert cp.select_columns(HEADER) == ["p_global_Mass", "Mass", "Hernia"]
    assert cp.select_columns(HEADER, labels=()) == ["p_global_Mass"]
    assert cp.select_columns(HEADER, prefixes=("q_",), labels=("Hernia",)) == ["Hernia"]
    assert cp.select_columns(HEADER, columns=["Mass"]) == ["Mass"]
    with pytest.raises(cp.Unusable):
        cp.select_columns(HEADER, columns=["Nodule"])


def test_explicit_columns_only_compare_those(cp, tmp_path):
    a = write(tmp_path / "a.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""]])
    b = write(tmp_path / "b.csv", HEADER, [["x", 0.9, 0.2, 0.3, ""]])
    assert cp.main([a, b]) == cp.EXIT_DIFFERENT
    assert cp.main([a, b, "--columns", "Mass,Hernia"]) == cp.EXIT_OK


def test_nan_and_empty_cells(cp, tmp_path):
    a = write(tmp_path / "a.csv", HEADER, [["x", "nan", "", 0.3, ""]])
    same = write(tmp_path / "b.csv", HEADER, [["x", "NaN", "", 0.3, ""]])
    differ = write(tmp_path / "c.csv", HEADER, [["x", 0.5, "", 0.3, ""]])
    assert cp.main([a, same]) == cp.EXIT_OK
    assert cp.main([a, differ]) == cp.EXIT_DIFFERENT


def test_unusable_inputs(cp, tmp_path):
    a = write(tmp_path / "a.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""]])
    dup = write(tmp_path / "d.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""], ["x", 0.1, 0.2, 0.3, ""]])
    lacking = write(tmp_path / "l.csv", ["path", "Mass", "Hernia"], [["x", 0.2, 0.3]])
    nokey = write(tmp_path / "k.csv", ["file", "Mass"], [["x", 0.2]])
    nothing = write(tmp_path / "n.csv", ["path", "note"], [["x", ""]])
    assert cp.main([a, dup]) == cp.EXIT_UNUSABLE
    assert cp.main([a, lacking]) == cp.EXIT_UNUSABLE
    assert cp.main([a, nokey]) == cp.EXIT_UNUSABLE
    assert cp.main([nothing, nothing]) == cp.EXIT_UNUSABLE
    assert cp.main([a, str(tmp_path / "missing.csv")]) == cp.EXIT_UNUSABLE
