"""scripts/compare_predictions.py: row matching, column selection, tolerance and exit codes."""

from __future__ import annotations

import csv
import os
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


# ---------------------------------------------------------------------- two predict runs

PRED = ["path", "status", "reason", "Mass", "Hernia"]
RUN = [
    ["a.dcm", "ok", "", 0.2, 0.3],
    ["b.dcm", "failed", "truncated: cut short", "", ""],
    ["c.txt", "skipped", "not_an_image: text", "", ""],
]


def test_runs_that_end_the_same_way_with_failures_are_compared(cp, tmp_path, capsys):
    # Exit 1 (a file failed) in both runs is an ending like any other: the values are compared.
    a = write(tmp_path / "a.csv", PRED, RUN)
    b = write(tmp_path / "b.csv", PRED, RUN)
    assert cp.main([a, b, "--statuses", "--cand-exit", "1"]) == cp.EXIT_OK
    assert cp.main([a, b, "--ref-exit", "1", "--cand-exit", "1"]) == cp.EXIT_OK
    far = write(tmp_path / "c.csv", PRED, [["a.dcm", "ok", "", 0.25, 0.3], *RUN[1:]])
    assert cp.main([a, far, "--statuses", "--cand-exit", "1"]) == cp.EXIT_DIFFERENT
    assert "'Mass'" in capsys.readouterr().err


def test_runs_that_end_differently_are_not_compared(cp, tmp_path, capsys):
    a = write(tmp_path / "a.csv", PRED, RUN)
    # Same values, but the container decoded b.dcm: a different ending, reported as such.
    decoded = write(tmp_path / "b.csv", PRED, [RUN[0], ["b.dcm", "ok", "", 0.5, 0.5], RUN[2]])
    assert cp.main([a, decoded, "--statuses"]) == cp.EXIT_DIFFERENT
    err = capsys.readouterr().err
    assert "ended differently" in err and "row 'b.dcm': failed truncated vs ok" in err
    assert "'Mass'" not in err  # values of runs that ended differently are not compared
    # Another reason code is another ending too.
    other = write(tmp_path / "c.csv", PRED, [RUN[0], ["b.dcm", "failed", "decode_error: x", "", ""], RUN[2]])
    assert cp.main([a, other, "--statuses"]) == cp.EXIT_DIFFERENT
    assert "failed truncated vs failed decode_error" in capsys.readouterr().err
    # Same rows, another exit status (the reference, inferred: 1, as b.dcm failed).
    same = write(tmp_path / "d.csv", PRED, RUN)
    assert cp.main([a, same, "--cand-exit", "0"]) == cp.EXIT_DIFFERENT
    assert "exit status: 1 in the reference run, 0 in the candidate run" in capsys.readouterr().err
    assert cp.main([a, same, "--ref-exit", "0", "--cand-exit", "1"]) == cp.EXIT_DIFFERENT
    # Status checks need predict outputs.
    assert cp.main([write(tmp_path / "e.csv", HEADER, [["x", 0.1, 0.2, 0.3, ""]])] * 2 + ["--statuses"]) == cp.EXIT_UNUSABLE


def test_docker_ci_lets_the_comparison_judge_a_predict_exit_1():
    # The container step must not stop at predict's exit 1; it hands the status to the comparison.
    text = (Path(__file__).resolve().parents[1] / "scripts" / "docker_ci.sh").read_text()
    step = text[text.index('step "predict in the container'):]
    assert "|| PRED_RC=$?" in step and '--cand-exit "$PRED_RC"' in step and "--statuses" in step
    assert '[ "$PRED_RC" -le 1 ] || die' in step


def _predict_step() -> str:
    """docker_ci.sh's "predict in the container" step, as bash text."""
    text = (Path(__file__).resolve().parents[1] / "scripts" / "docker_ci.sh").read_text()
    start = text.index('    step "predict in the container')
    end = text.index('step "summary"')
    return text[start:end].rsplit("fi", 1)[0]


# Stands in for podman: `crun_ -v SRC:DST[:ro] ... IMAGE predict ARGS` runs `agcnn predict ARGS` on
# the host with each container path DST replaced by its SRC.
FAKE_PODMAN = r'''
step() { :; }
die() { echo "docker_ci: FAILED: $*" >&2; exit 1; }
crun_() {
    local maps=() args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -v) maps+=("$2"); shift 2 ;;
            "$IMAGE") shift; break ;;
            *) shift ;;
        esac
    done
    for a in "$@"; do
        for m in "${maps[@]}"; do
            src="${m%%:*}"; rest="${m#*:}"; dst="${rest%%:*}"
            case "$a" in "$dst"|"$dst"/*) a="$src${a#"$dst"}" ;; esac
        done
        args+=("$a")
    done
    "$PY" -m agcnn "${args[@]}"
}
'''


@pytest.mark.slow
def test_docker_ci_predict_step_compares_a_folder_with_a_broken_file(tmp_path):
    """The script's own predict step, with podman replaced by a host run: exit 1 on both sides."""
    import subprocess
    import sys

    import numpy as np
    import torch
    from PIL import Image

    from agcnn.checkpoint import save_checkpoint
    from agcnn.config import Config
    from agcnn.data.dicom_write import write_dicom
    from agcnn.labels import LABELS
    from agcnn.models import AGCNN

    data = tmp_path / "input"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 72), dtype=np.uint8)).save(data / "a.png")
    write_dicom(data / "b.dcm", rng.integers(0, 4095, (90, 80)).astype(np.uint16), modality="DX")
    (data / "cut.dcm").write_bytes((data / "b.dcm").read_bytes()[:2000])
    cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64},
                            "data": {"image_size": 64, "highres_size": 64, "resize": 72}})
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model_state=AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64).state_dict(),
                    config=cfg)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    ref = subprocess.run([sys.executable, "-m", "agcnn", "predict", "--checkpoint", str(ckpt), "--input", str(data),
                          "--output", str(tmp_path / "host"), "--device", "cpu", "--workers", "0"],
                         capture_output=True, text=True, env=env)
    assert ref.returncode == 1, ref.stderr  # cut.dcm failed, by design

    def run_step(ref_csv: Path, work: Path) -> subprocess.CompletedProcess:
        work.mkdir()
        script = FAKE_PODMAN + _predict_step()
        env_step = {**env, "PY": sys.executable, "REPO": str(Path(__file__).resolve().parents[1]), "IMAGE": "img",
                    "WORK": str(work), "ATOL": "1e-5", "PREDICT_INPUT": str(data), "PREDICT_CKPT": str(ckpt),
                    "PREDICT_REF": str(ref_csv), "APP_UID": str(os.getuid())}
        return subprocess.run(["bash", "-c", "set -euo pipefail; PREDICT_ARGS=(--device cpu --workers 0)\n" + script],
                              capture_output=True, text=True, env=env_step)

    ok = run_step(tmp_path / "host" / "predictions.csv", tmp_path / "w1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "exit status 1" in ok.stdout and "compare_predictions: OK: 3 rows" in ok.stdout

    # A reference in which cut.dcm was decoded: the runs ended differently, and the step says so.
    rows = list(csv.DictReader(open(tmp_path / "host" / "predictions.csv", newline="")))
    for r in rows:
        if r["path"] == "cut.dcm":
            r.update(status="ok", reason="")
    other = tmp_path / "other.csv"
    with open(other, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bad = run_step(other, tmp_path / "w2")
    assert bad.returncode == 1
    assert "row 'cut.dcm': ok vs failed truncated" in bad.stderr and "differs from the host run" in bad.stderr
