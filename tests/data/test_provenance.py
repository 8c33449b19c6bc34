"""What a checkpoint records of the patients its branches were trained on, and who may read it.

The tables are small CSV exports of noise PNGs with a split column, so each test decides which
patient sits where: ``yesterday`` trained the global branch, ``today`` holds ten of its training
patients (written zero-padded) in its test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from agcnn.checkpoint import load_checkpoint
from agcnn.cli import main
from agcnn.config import Config
from agcnn.data import provenance
from agcnn.data.provenance import (
    IMAGE_WISE,
    ProvenanceError,
    carry_forward,
    check_evaluated_set,
    keyed_hashes,
    site_key,
    split_record,
)
from agcnn.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.pretrained=none",
    "model.backbone=resnet18", "model.local_size=32", "data.image_size=32", "data.resize=32", "data.highres_size=48",
    "data.num_workers=0", "train.device=cpu", "train.channels_last=false", "train.global.batch_size=8",
    "train.local.batch_size=8", "train.fusion.batch_size=8", "train.global.epochs=1", "train.local.epochs=1",
    "train.fusion.epochs=1", "train.bootstrap=0", "data.dataset=csv",
]
KEY = "0123456789abcdef-site-key-for-tests"


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_FILE_ENV, raising=False)


@pytest.fixture
def with_key(monkeypatch, tmp_path):
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    path = tmp_path / "site.key"
    path.write_text(KEY + "\n")
    monkeypatch.setenv(provenance.KEY_FILE_ENV, str(path))
    return KEY.encode()


def write_table(root: Path, name: str, rows: list[tuple[str, str, str]], *, patients: bool = True) -> Path:
    """``rows``: (image file name, patient ID, split); noise PNGs whose labels alternate per image."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for i, (image, patient, split) in enumerate(rows):
        rng = np.random.default_rng(abs(hash(image)) % 2**32)
        cv2.imwrite(str(root / "img" / image), rng.integers(0, 255, (40, 40), dtype=np.uint8))
        row = {"path": f"img/{image}", "split": split, **{n: str((i + k) % 2) for k, n in enumerate(LABELS)}}
        if patients:
            row["patient"] = patient
        out.append(row)
    path = root / name
    pd.DataFrame(out).to_csv(path, index=False)
    return path


def yesterday(root: Path) -> Path:
    """Patients 1-28 train, 29-34 val, 35-40 test."""
    rows = [(f"y{p}.png", str(p), "train" if p <= 28 else "val" if p <= 34 else "test") for p in range(1, 41)]
    return write_table(root, "yesterday.csv", rows)


def today(root: Path) -> Path:
    """Patients 1-10 (zero-padded: yesterday's training patients 1-10) test, 41-46 val, 47-74 train."""
    rows = [(f"t{p}.png", f"{p:08d}", "test") for p in range(1, 11)]
    rows += [(f"t{p}.png", f"{p:08d}", "val" if p <= 46 else "train") for p in range(41, 75)]
    return write_table(root, "today.csv", rows)


def config(tmp_path: Path, table: Path, *extra: str) -> Path:
    path = tmp_path / f"{table.stem}.yaml"
    Config.load(None, [*TINY, f"data.root={table.parent}", f"data.metadata={table}", *extra]).dump(path)
    return path


def train_cli(cfg: Path, out: Path, *args: str) -> int:
    return main(["train", "--config", str(cfg), "--out", str(out), "--no-progress", *args])


# ---------------------------------------------------------------------- seeding across tables

def test_seeding_from_a_global_trained_on_todays_test_patients_is_refused(tmp_path, capsys, with_key):
    data = tmp_path / "data"
    assert train_cli(config(tmp_path, yesterday(data)), tmp_path / "a", "--stage", "global") == 0
    seed = tmp_path / "a" / "global" / "best.pt"
    cfg_b = config(tmp_path, today(data))
    capsys.readouterr()
    run_b = tmp_path / "b"
    assert train_cli(cfg_b, run_b, "--stage", "local", "--seed-from", str(seed)) == 2
    err = capsys.readouterr().err
    assert "refusing to seed the local stage" in err and "global branch of that checkpoint was trained on 10 patients" in err
    assert "10 in its test split" in err and "data.metadata:" in err and "--allow-seed-overlap" in err
    assert not run_b.exists()  # refused before anything was written

    # Allowed: it trains, and the record carries both runs, branch by branch, and the statement.
    assert train_cli(cfg_b, run_b, "--stage", "local", "--seed-from", str(seed), "--allow-seed-overlap") == 0
    record = load_checkpoint(run_b / "local" / "best.pt")["split"]
    first = load_checkpoint(seed)["split"]["current"]
    assert len(record["runs"]) == 2 and record["branches"]["global"] == [first]
    assert record["branches"]["local"] == [record["current"]] and record["current"] != first
    assert any("--allow-seed-overlap" in s for s in record["allowed"])

    # evaluate refuses the test set, which holds the global branch's training patients: exit 2, no report.
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(run_b / "local" / "best.pt"), "--split", "test", "--out", str(out),
            "--bootstrap", "0", "--no-roc"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "10 of the 10 patients of the test set have images the global branch of the checkpoint was trained on" in err
    assert not out.exists()
    assert main([*argv, "--allow-other-split"]) == 0
    title = (out / "auc.md").read_text().splitlines()[0]
    assert "--allow-seed-overlap" in title and "--allow-other-split" in (out / "auc.md").read_text()
    # Validation numbers of today's run hold none of yesterday's patients: evaluated without a flag.
    assert main(["evaluate", "--checkpoint", str(run_b / "local" / "best.pt"), "--split", "val", "--out",
                 str(tmp_path / "val"), "--bootstrap", "0", "--no-roc"]) == 0
    assert "--allow-seed-overlap" in (tmp_path / "val" / "auc.md").read_text().splitlines()[0]


def test_resuming_on_a_table_that_holds_out_the_run_s_training_patients_is_refused(tmp_path, capsys, with_key):
    data = tmp_path / "data"
    run = tmp_path / "run"
    assert train_cli(config(tmp_path, yesterday(data)), run, "--stage", "global") == 0
    before = (run / "global" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_cli(config(tmp_path, today(data), "train.global.epochs=2"), run, "--stage", "global", "--resume") == 2
    err = capsys.readouterr().err
    assert "refusing to resume the global stage" in err and "trained on 10 patients" in err
    assert (run / "global" / "last.pt").read_bytes() == before


def test_without_the_site_key_the_overlap_cannot_be_ruled_out_and_is_refused(tmp_path, capsys, no_key):
    data = tmp_path / "data"
    assert train_cli(config(tmp_path, yesterday(data)), tmp_path / "a", "--stage", "global") == 0
    record = load_checkpoint(tmp_path / "a" / "global" / "best.pt")["split"]
    run = record["runs"][record["current"]]
    assert "hashes" not in run["train"] and run["key_id"] is None and run["train"]["patients"] == 28
    capsys.readouterr()
    assert train_cli(config(tmp_path, today(data)), tmp_path / "b", "--stage", "local", "--seed-from",
                     str(tmp_path / "a" / "global" / "best.pt")) == 2
    err = capsys.readouterr().err
    assert "cannot be checked" in err and "without a site key" in err and not (tmp_path / "b").exists()


def test_stages_run_one_at_a_time_on_one_table_need_no_key(tmp_path, capsys, no_key):
    # The record's digests show the table rebuilt here is the one each run trained on.
    cfg = config(tmp_path, today(tmp_path / "data"))
    run = tmp_path / "run"
    assert train_cli(cfg, run, "--stage", "global") == 0
    assert train_cli(cfg, run, "--stage", "local") == 0
    record = load_checkpoint(run / "local" / "best.pt")["split"]
    assert len(record["runs"]) == 2 and record["allowed"] == []
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "local" / "best.pt"), "--split", "test", "--out", str(out),
                 "--bootstrap", "0", "--no-roc"]) == 0
    report = json.loads((out / "auc.json").read_text())
    assert report["split"]["patients_also_in_train"] == 0 and report["split"]["patient_wise"] is True
    # The model card reads the record of the run that wrote the checkpoint.
    assert main(["card", str(run / "local" / "best.pt"), "--out", str(tmp_path / "card.md")]) == 0
    card = (tmp_path / "card.md").read_text()
    assert "| train | 28 | 28 |" in card and "| val | 6 | 6 |" in card and "2 training run(s)" in card


# ---------------------------------------------------------------------- patient IDs

def test_padded_and_plain_ids_are_one_patient_in_hashes_and_checks(with_key):
    assert keyed_hashes(["13"], with_key) == keyed_hashes(["00000013"], with_key) == keyed_hashes([" 13 "], with_key)
    assert keyed_hashes(["P7"], with_key) == keyed_hashes(["p7"], with_key) != keyed_hashes(["P07"], with_key)
    cfg = Config.load(None, TINY)
    train = pd.DataFrame({"path": ["a.png", "b.png"], "patient": ["13", "14"]})
    record = split_record(cfg.data, {"train": train, "val": pd.DataFrame({"path": ["c.png"], "patient": ["20"]})},
                          key=with_key)
    evaluated = pd.DataFrame({"path": ["x.png", "y.png"], "patient": ["00000013", "99"]})
    with pytest.raises(ProvenanceError, match="1 of the 2 patients of the evaluated set"):
        check_evaluated_set({"split": record}, evaluated, key=with_key)
    # A validation patient is no training patient: evaluated, and said in every report.
    info = check_evaluated_set({"split": record}, evaluated.assign(patient=["020", "99"]), name="test", key=with_key)
    assert info["patients_also_in_train"] == 0 and info["patients_also_in_validation"] == 1
    assert "1 of the test set's patients were validation patients" in info["statements"][-1]


# ---------------------------------------------------------------------- privacy

def test_a_checkpoint_holds_no_clear_path_or_id_and_hashes_need_the_key(tmp_path, with_key, capsys):
    rows = [(f"smith_john_{p}.png", f"MRN-{p:06d}", "train" if p < 30 else "val" if p < 36 else "test") for p in range(40)]
    rows.append(("doe_jane_broken.png", "MRN-777777", "train"))
    table = write_table(tmp_path / "data", "labels.csv", rows)
    (tmp_path / "data" / "img" / "doe_jane_broken.png").write_bytes(b"<html>not an image</html>")
    run = tmp_path / "run"
    assert train_cli(config(tmp_path, table, "data.skip_unreadable=true"), run, "--stage", "global") == 0
    for name in ("best.pt", "last.pt"):
        raw = (run / "global" / name).read_bytes()
        for image, patient, _ in rows:
            assert image.encode() not in raw and patient.encode() not in raw
            assert patient.lower().encode() not in raw and KEY.encode() not in raw
        assert b"smith_john" not in raw and b"doe_jane" not in raw
    ckpt = load_checkpoint(run / "global" / "last.pt")
    assert ckpt["left_out"] == [{"split": "train", "reason": "not_an_image", "files": 1}]
    run_record = ckpt["split"]["runs"][ckpt["split"]["current"]]
    # The hashes are keyed: without the key (or with another) an ID cannot be tested against them.
    hashes = set(run_record["train"]["hashes"])
    # 31: the record is of the split as its settings define it, before the pre-check left one file out.
    assert len(hashes) == 31 and keyed_hashes(["MRN-000001"], with_key) <= hashes
    assert not keyed_hashes(["MRN-000001"], b"another key of sixteen bytes or more") & hashes
    import hashlib

    assert not {hashlib.sha256(b"mrn-000001").hexdigest()[:16], hashlib.sha256(b"MRN-000001").hexdigest()[:16]} & hashes
    assert run_record["key_id"] == provenance.key_id(with_key)
    evaluated = pd.DataFrame({"path": ["q.png"], "patient": ["MRN-000001"]})
    with pytest.raises(ProvenanceError, match="another site key"):
        check_evaluated_set(ckpt, evaluated, key=b"another key of sixteen bytes or more")


def test_site_key_settings_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_FILE_ENV, raising=False)
    assert site_key() is None
    monkeypatch.setenv(provenance.KEY_ENV, "short")
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        site_key()
    monkeypatch.setenv(provenance.KEY_FILE_ENV, str(tmp_path / "none"))
    with pytest.raises(ValueError, match="set one of them"):
        site_key()
    monkeypatch.delenv(provenance.KEY_ENV)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        site_key()
    (tmp_path / "k").write_bytes(b"x" * 32 + b"\n")
    monkeypatch.setenv(provenance.KEY_FILE_ENV, str(tmp_path / "k"))
    assert site_key() == b"x" * 32


def test_without_a_key_the_record_holds_counts_and_set_digests_only(no_key):
    cfg = Config.load(None, TINY)
    train = pd.DataFrame({"path": ["a/1.png", "a/2.png", "b/3.png"], "patient": ["13", "13", "8"]})
    val = pd.DataFrame({"path": ["c.png"], "patient": ["20"]})
    record = split_record(cfg.data, {"train": train, "val": val})
    run = record["runs"][record["current"]]
    assert run["train"]["images"] == 3 and run["train"]["patients"] == 2 and "hashes" not in run["train"]
    # One digest of the whole set, in no order, under the run's own nonce: it changes with any one ID.
    again = provenance.split_summary(train.iloc[::-1], run["id"])
    assert again["patients_digest"] == run["train"]["patients_digest"]
    other = provenance.split_summary(train.assign(patient=["13", "13", "9"]), run["id"])
    assert other["patients_digest"] != run["train"]["patients_digest"]
    assert split_record(cfg.data, {"train": train, "val": val})["runs"].popitem()[1]["train"]["patients_digest"] != \
        run["train"]["patients_digest"]  # another run's nonce: two checkpoints cannot be linked by their digests


def test_carry_forward_keeps_each_branch_its_runs():
    cfg = Config.load(None, TINY)
    t = {"train": pd.DataFrame({"path": ["a.png"], "patient": ["1"]}), "val": pd.DataFrame({"path": ["b.png"], "patient": ["2"]})}
    first = carry_forward(split_record(cfg.data, t), None, ("global_branch",))
    second = carry_forward(split_record(cfg.data, t), {"split": first}, ("local_branch",))
    third = carry_forward(split_record(cfg.data, t), {"split": second}, ("fusion",), {"fusion": "global_branch"})
    a, b, c = first["current"], second["current"], third["current"]
    assert third["branches"] == {"global": [a], "local": [b], "fusion": sorted([a, c])}
    # A local branch that starts as the global one carries the global branch's patients too.
    copied = carry_forward(split_record(cfg.data, t), {"split": first}, ("local_branch",), {"local_branch": "global_branch"})
    assert copied["branches"]["local"] == sorted([a, copied["current"]])
    # Fine-tuning everything (G L F*) adds this run to every branch.
    tuned = carry_forward(split_record(cfg.data, t), {"split": third}, ("global_branch", "local_branch", "fusion"))
    assert all(tuned["current"] in tuned["branches"][x] for x in ("global", "local", "fusion"))
    # Data without a table on top of recorded weights: the record goes on, this run's patients unknown.
    on = carry_forward(None, {"split": third}, ("fusion",))
    assert set(on["runs"]) == {a, b, c, "unrecorded"} and on["branches"]["fusion"] == sorted([a, c, "unrecorded"])
    assert carry_forward(None, None, ("global_branch",)) is None
    # A seed without any record: its branches' patients are unknown, and evaluation cannot rule them out.
    blind = carry_forward(split_record(cfg.data, t), {"model": {}}, ("fusion",))
    assert "unrecorded" in blind["branches"]["global"]
    with pytest.raises(ProvenanceError, match="records no training split"):
        check_evaluated_set({"split": blind}, pd.DataFrame({"path": ["z.png"], "patient": ["5"]}))


# ---------------------------------------------------------------------- image-wise tables

def test_a_table_without_patients_is_split_by_image_only_when_configured_and_every_report_says_so(tmp_path, capsys,
                                                                                                no_key):
    rows = [(f"i{k}.png", "", "train" if k < 24 else "val" if k < 30 else "test") for k in range(36)]
    table = write_table(tmp_path / "data", "labels.csv", rows, patients=False)
    assert train_cli(config(tmp_path, table), tmp_path / "refused", "--stage", "global") == 2
    assert "data.image_wise_split: true" in capsys.readouterr().err
    run = tmp_path / "run"
    assert train_cli(config(tmp_path, table, "data.image_wise_split=true"), run, "--stage", "global") == 0
    ckpt = run / "global" / "best.pt"
    assert load_checkpoint(ckpt)["split"]["runs"].popitem()[1]["image_wise"] is True
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "test", "--out", str(out), "--bootstrap", "0"]) == 0
    assert IMAGE_WISE in (out / "auc.md").read_text().splitlines()[0]
    assert IMAGE_WISE in capsys.readouterr().out
    assert IMAGE_WISE in json.loads((out / "auc.json").read_text())["split"]["caveats"]
    # localize on the held-out images: allowed (the rebuilt table's digests match), and titled image-wise.
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,label,x0,y0,x1,y1\nimg/i30.png,Mass,4,4,30,30\nimg/i31.png,Nodule,2,2,20,20\n")
    loc = tmp_path / "loc"
    assert main(["localize", "--checkpoint", str(ckpt), "--boxes", str(boxes), "--images", str(tmp_path / "data"),
                 "--out", str(loc), "--bootstrap", "0", "--cases", "0", "--device", "cpu"]) == 0
    assert IMAGE_WISE in (loc / "localization.md").read_text().splitlines()[0]


# ---------------------------------------------------------------------- localize

def test_localize_refuses_boxes_on_training_patients_images(tmp_path, capsys, no_key):
    table = today(tmp_path / "data")
    run = tmp_path / "run"
    assert train_cli(config(tmp_path, table), run, "--stage", "global") == 0
    ckpt = run / "global" / "best.pt"
    boxes = tmp_path / "boxes.csv"
    # t50.png: a training patient's image; t3.png: a test patient's.
    boxes.write_text("path,label,x0,y0,x1,y1\nimg/t50.png,Mass,4,4,30,30\nimg/t3.png,Nodule,2,2,20,20\n")
    out = tmp_path / "loc"
    argv = ["localize", "--checkpoint", str(ckpt), "--boxes", str(boxes), "--images", str(tmp_path / "data"),
            "--out", str(out), "--bootstrap", "0", "--cases", "0", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to localise" in err and "boxed images" in err and not out.exists()
    # Held-out images only: scored.
    boxes.write_text("path,label,x0,y0,x1,y1\nimg/t3.png,Nodule,2,2,20,20\nimg/t42.png,Mass,4,4,30,30\n")
    assert main(argv) == 0
    report = json.loads((out / "localization.json").read_text())
    assert report["settings"]["training_patients"]["problems"] == []


def test_localize_with_the_key_counts_a_training_patient_of_another_table(tmp_path, capsys, with_key):
    data = tmp_path / "data"
    assert train_cli(config(tmp_path, yesterday(data)), tmp_path / "a", "--stage", "global") == 0
    ckpt = tmp_path / "a" / "global" / "best.pt"
    # NIH-named images: their patient is the name's prefix, 00000005 = yesterday's training patient 5.
    for name in ("00000005_000.png", "00000039_001.png"):
        cv2.imwrite(str(data / "img" / name), np.zeros((40, 40), np.uint8))
    boxes = tmp_path / "BBox_List_2017.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000005_000.png,Mass,100,100,200,200\n"
                     "00000039_001.png,Mass,100,100,200,200\n")
    argv = ["localize", "--checkpoint", str(ckpt), "--boxes", str(boxes), "--images", str(data / "img"),
            "--out", str(tmp_path / "loc"), "--bootstrap", "0", "--cases", "0", "--device", "cpu"]
    # The rebuilt table does not hold these images, so the keyed hashes decide: patient 5 trained it.
    assert main(argv) == 2
    assert "1 of the 2 patients of the boxed images set" in capsys.readouterr().err
    assert main([*argv, "--allow-other-split"]) == 0
    assert "--allow-other-split" in (tmp_path / "loc" / "localization.md").read_text().splitlines()[0]


def test_localize_on_another_sites_boxes_declared_external(tmp_path, capsys, with_key):
    data = tmp_path / "data"
    assert train_cli(config(tmp_path, yesterday(data)), tmp_path / "a", "--stage", "global") == 0
    ckpt = tmp_path / "a" / "global" / "best.pt"
    # Another site's film names: no table here and no ChestX-ray14 name gives their patients.
    for name in ("siteB_a1.png", "siteB_a2.png", "00000005_000.png"):
        cv2.imwrite(str(data / "img" / name), np.zeros((40, 40), np.uint8))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,label,x0,y0,x1,y1\nsiteB_a1.png,Mass,4,4,30,30\nsiteB_a2.png,Nodule,2,2,20,20\n")
    out = tmp_path / "loc"
    argv = ["localize", "--checkpoint", str(ckpt), "--boxes", str(boxes), "--images", str(data / "img"),
            "--out", str(out), "--bootstrap", "0", "--cases", "0", "--device", "cpu"]
    assert main(argv) == 2
    assert "the patients of 2 of the 2 boxed images are not known" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--external-site"]) == 0
    said = ("external site: declared (--external-site) to hold no patient of the training data; 2 of the 2 boxed "
            "images not checked")
    assert said in (out / "localization.md").read_text().splitlines()[0]
    report = json.loads((out / "localization.json").read_text())
    assert report["settings"]["training_patients"]["problems"] == []
    # A film whose patient can be counted, and who trained the checkpoint, is refused even so.
    boxes.write_text("path,label,x0,y0,x1,y1\nsiteB_a1.png,Mass,4,4,30,30\n00000005_000.png,Mass,4,4,30,30\n")
    assert main([*argv, "--external-site", "--out", str(tmp_path / "loc2")]) == 2
    err = capsys.readouterr().err
    assert "1 of the 1 patients of the boxed images set" in err and "although --external-site" in err


def test_old_records_are_still_checked():
    """Version 1 records: salted, unkeyed hashes of the raw IDs."""
    import hashlib

    salt = "ab12"
    old = {"settings": {}, "train": {"images": 1, "patients": 1}, "val": {"images": 1, "patients": 1}, "salt": salt,
           "train_patients": [hashlib.sha256(f"{salt}\0{p}".encode()).hexdigest()[:16] for p in ("7",)]}
    with pytest.raises(ProvenanceError, match="1 of the 2 patients"):
        check_evaluated_set({"split": old}, pd.DataFrame({"path": ["a", "b"], "patient": ["7", "8"]}), key=b"k" * 16)
    info = check_evaluated_set({"split": old}, pd.DataFrame({"path": ["a"], "patient": ["9"]}), key=b"k" * 16)
    assert info["patients_also_in_train"] == 0


# ---------------------------------------------------------------------- the real NIH boxes

NIH_META = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih-metadata"


@pytest.mark.skipif(not (NIH_META / "BBox_List_2017.csv.gz").is_file(),
                    reason=f"real NIH metadata not found at {NIH_META} (shared/ beside the clone)")
def test_nih_boxes_are_held_out_by_the_official_split_and_not_by_a_chexnet_one(with_key):
    """The 880 boxed images are official test images; CheXNet's random split trains on most of their patients."""
    from agcnn.data.chestxray14 import load_chestxray14, patient_from_name
    from agcnn.data.boxes import read_box_table

    boxes = read_box_table(NIH_META / "BBox_List_2017.csv.gz", LABELS)
    names = sorted(set(boxes["path"]))
    boxed = pd.DataFrame({"path": names, "patient": [patient_from_name(n) for n in names]})
    data = Config.load(None, TINY).data
    chexnet = NIH_META / "chexnet-arnoweng-split"
    for lists, overlap in [({"train_list": "train_val_list.txt", "test_list": "test_list.txt"}, 0),
                           ({"train_list": chexnet / "train_list.txt", "val_list": chexnet / "val_list.txt",
                             "test_list": chexnet / "test_list.txt"}, 511)]:
        table = load_chestxray14(NIH_META, metadata=NIH_META / "Data_Entry_2017_v2020.csv.gz", labels=list(LABELS),
                                 check_files=False, **{k: str(NIH_META / v) for k, v in lists.items()})
        record = split_record(data, {s: table[table["split"] == s] for s in ("train", "val")}, key=with_key)
        info = check_evaluated_set({"split": record}, boxed, name="boxed images", allow=True, key=with_key)
        assert len(names) == 880 and info["patients_also_in_train"] == overlap


def test_a_calibration_set_is_recorded_and_checked_like_a_split(with_key, monkeypatch):
    from agcnn.data.provenance import set_overlap, set_record

    fitted = pd.DataFrame({"path": ["a/x1.png", "a/x2.png", "a/x3.png"], "patient": ["0007", "8", "8"]})
    record = set_record(fitted, key=with_key)
    assert record["images"] == 3 and record["patients"] == 2 and len(record["hashes"]) == 2
    later = pd.DataFrame({"path": ["b/y.png", "b/x2.png"], "patient": ["7", "9"]})
    assert set_overlap(record, later, key=with_key) == (1, "patients")
    # Without patient IDs the image file names are compared, also keyed.
    names = pd.DataFrame({"path": ["c/x2.png", "c/z.png"], "patient": ["image-0", "image-1"]})
    assert set_overlap(record, names, key=with_key) == (1, "image files")
    # Without the key (or with another) it cannot be told.
    assert set_overlap(record, later, key=b"another key of sixteen bytes")[0] is None
    # Without a site key in the environment: counts and digests only.
    monkeypatch.delenv(provenance.KEY_FILE_ENV)
    bare = set_record(fitted)
    assert bare["key_id"] is None and "hashes" not in bare and "image_hashes" not in bare and bare["patients"] == 2
    assert set_overlap(bare, later) == (None, "patients")
    # ... unless the set is a split of the table rebuilt here: its digest says which.
    held = pd.DataFrame({"path": ["t1.png", "t2.png"], "patient": ["9", "10"]})
    whole = pd.concat([fitted.assign(split="val"), held.assign(split="test")], ignore_index=True)
    assert set_overlap(bare, held, whole=whole) == (0, "patients")
    assert set_overlap(bare, fitted.iloc[:2], whole=whole) == (2, "patients")
