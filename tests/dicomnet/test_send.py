"""``agcnn send`` against a real PACS (Orthanc on loopback): the results predict wrote arrive in
their studies, a re-run sends nothing, refusals and rejections are reported with their status,
and a refused object is sent again by the next run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agcnn.cli import main
from pacs import free_port

REFUSE_CAPTURES = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SOPClassUID == '1.2.840.10008.5.1.4.1.1.7' then error('no secondary captures here') end
  return true
end
"""


@pytest.fixture
def results(study_files, node_checkpoint, tmp_path) -> tuple[Path, dict]:
    """The --dicom-out folder of a predict run over the five films (an SR and a capture per frontal chest film)."""
    files = study_files(tmp_path / "studies")
    dicom = tmp_path / "results"
    assert main(["predict", "--checkpoint", str(node_checkpoint), "--input", str(tmp_path / "studies"),
                 "--output", str(tmp_path / "out"), "--dicom-out", str(dicom), "--workers", "0", "--device", "cpu"]) == 0
    assert len(list(dicom.iterdir())) == 6
    return dicom, files


def _journal(folder: Path) -> list[dict[str, str]]:
    with open(folder / "sent.csv", newline="") as f:
        return list(csv.DictReader(f))


def _send(folder: Path, to: str, *extra: str) -> int:
    return main(["send", str(folder), "--to", to, "--ae-title", "SENDER", "--timeout", "10", *extra])


def test_results_arrive_in_their_studies_and_a_rerun_sends_nothing(orthanc, results, capsys):
    folder, files = results
    (folder / "README.txt").write_text("not a DICOM file")
    pacs = orthanc(modalities={"sender": ("SENDER", 1)})
    assert _send(folder, pacs.address) == 0
    err = capsys.readouterr().err
    assert "6 DICOM objects" in err and "6 accepted now, 0 accepted before, 0 refused, 0 failed" in err
    assert "1 files are not DICOM" in err
    rows = _journal(folder)
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in folder.glob("*.dcm"))
    assert {(r["outcome"], r["status"]) for r in rows} == {("accepted", "0x0000")}
    by_study = pacs.instances_by_study()
    chest_studies = {files[n].StudyInstanceUID for n in ("chest1.dcm", "chest2.dcm", "chest3.dcm")}
    assert set(by_study) == chest_studies  # the SR and capture of each film are filed with its study
    assert all(sorted(t["Modality"] for t in tags)[-1] == "SR" and len(tags) == 2 for tags in by_study.values())

    assert _send(folder, pacs.address) == 0
    assert "0 accepted now, 6 accepted before" in capsys.readouterr().err
    assert len(_journal(folder)) == 6  # nothing was sent, so nothing was journalled
    assert sum(len(t) for t in pacs.instances_by_study().values()) == 6

    # A file rewritten since it was accepted is sent again.
    sr = next(folder.glob("*.sr.dcm"))
    data = sr.read_bytes()
    sr.unlink()
    sr.write_bytes(data)
    assert _send(folder, pacs.address) == 0
    assert "1 accepted now, 5 accepted before" in capsys.readouterr().err


def test_refused_objects_are_reported_with_their_status_and_sent_again_next_time(orthanc, results, capsys):
    folder, _ = results
    pacs = orthanc(modalities={"sender": ("SENDER", 1)}, lua=REFUSE_CAPTURES)
    assert _send(folder, pacs.address) == 1
    err = capsys.readouterr().err
    assert "3 accepted now, 0 accepted before, 3 refused, 0 failed" in err
    captures = sorted(p.name for p in folder.glob("*.sc.dcm"))
    for name in captures:
        assert f"{name}: refused, status 0xA700 Failure: Refused: Out of Resources" in err
    rows = _journal(folder)
    assert sorted(r["path"] for r in rows if r["outcome"] == "refused") == captures
    assert {r["status"] for r in rows if r["outcome"] == "refused"} == {"0xA700"}

    assert _send(folder, pacs.address) == 1  # only the refused ones go again
    assert "0 accepted now, 3 accepted before, 3 refused" in capsys.readouterr().err
    assert sorted(r["path"] for r in _journal(folder)[6:]) == captures


def test_unknown_calling_ae_and_nothing_listening_fail_with_the_reason(orthanc, results, capsys, caplog, tmp_path):
    folder, _ = results
    pacs = orthanc(modalities={"sender": ("SENDER", 1)})
    assert main(["send", str(folder), "--to", pacs.address, "--ae-title", "STRANGER", "--retries", "1",
                 "--retry-wait", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "0 accepted now, 0 accepted before, 0 refused, 6 failed" in err
    assert "rejected by" in err and "Calling AE title not recognised" in err
    assert "trying again in 0.1 s (attempt 2 of 2)" in caplog.text
    assert [r["outcome"] for r in _journal(folder)] == ["failed"] * 12  # both attempts journalled
    assert pacs.instances_by_study() == {}

    journal = tmp_path / "elsewhere.csv"
    assert _send(folder, f"NOBODY@127.0.0.1:{free_port()}", "--retries", "0", "--journal", str(journal)) == 1
    assert "cannot connect to 127.0.0.1:" in capsys.readouterr().err
    assert journal.exists() and not (folder / "sent.csv").read_text().count("NOBODY")
