"""The loop closed with a real PACS: Orthanc sends chest, lateral and abdomen films to
``agcnn serve``, and the SRs come back into the same studies -- once, whatever is sent twice,
and whatever a ``kill -9`` interrupts.

The node runs as its own process (``python -m agcnn serve``), on loopback, on a port the system
chooses; Orthanc learns it through its REST API.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pacs import PATIENT_IDS, PATIENT_NAMES, STUDIES, die_with_parent

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class NodeProcess:
    """``agcnn serve`` in a subprocess; its stderr collected by a thread."""

    def __init__(self, checkpoint: Path, out: Path, orthanc, *extra: str):
        cmd = [sys.executable, "-m", "agcnn", "serve", "--checkpoint", str(checkpoint), "--output", str(out),
               "--ae-title", "AGCNN", "--port", "0", "--bind", "127.0.0.1", "--allow-ae", "ORTHANC",
               "--forward", orthanc.address, "--device", "cpu", "--batch-wait", "0.3",
               "--forward-retry-wait", "1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=die_with_parent)
        self.lines: list[str] = []
        self.port: int | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        ready.wait(120)
        if self.port is None:
            self.stop()
            raise AssertionError("agcnn serve did not start:\n" + "".join(self.lines))
        orthanc.set_modality("agcnn", "AGCNN", self.port)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []

    def start(*args, **kwargs) -> NodeProcess:
        started.append(NodeProcess(*args, **kwargs))
        return started[-1]

    yield start
    for n in started:
        n.stop()


def _wait_for(predicate, what: str, node: NodeProcess, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline or node.proc.poll() is not None:
            raise AssertionError(f"{what}: timed out (node exit {node.proc.poll()})\n{node.output[-4000:]}")
        time.sleep(0.25)


def _results_by_study(orthanc) -> dict[str, list[str]]:
    """StudyInstanceUID -> the SOP classes of the instances Orthanc holds in it, sorted."""
    return {study: sorted(t["SOPClassUID"] for t in tags) for study, tags in orthanc.instances_by_study().items()}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _upload(orthanc, folder: Path, names) -> list[str]:
    return [orthanc.upload(folder / name) for name in names]


def _store_to_node(orthanc, ids: list[str]) -> None:
    # Synchronous: returns once the node has answered every C-STORE.
    orthanc.post("/modalities/agcnn/store", {"Resources": ids, "Synchronous": True})


def test_orthanc_sends_studies_and_gets_one_sr_back_per_frontal_chest_film(orthanc, study_files, node_checkpoint,
                                                                          tmp_path, nodes):
    pacs = orthanc(modalities={"agcnn": ("AGCNN", 1)})
    files = study_files(tmp_path / "studies")
    ids = _upload(pacs, tmp_path / "studies", STUDIES)
    out = tmp_path / "node"
    node = nodes(node_checkpoint, out, pacs)
    assert pacs.post("/modalities/agcnn/echo", {}) == {}  # C-ECHO answered

    _store_to_node(pacs, ids)
    predicted = {name: files[name].StudyInstanceUID for name, (_, frontal) in STUDIES.items() if frontal}
    # Each predicted study: its film, an SR and a Secondary Capture; every other study only its film.
    expected = {files[name].StudyInstanceUID: sorted([files[name].SOPClassUID] + ([SR_CLASS, SC_CLASS] if frontal else []))
                for name, (_, frontal) in STUDIES.items()}
    _wait_for(lambda: _results_by_study(pacs) == expected, "three SRs and captures back in their studies", node)
    assert len(predicted) == 3

    rows = {r["sop_instance_uid"]: r for r in _rows(out)}
    assert len(rows) == 5
    by_name = {name: rows[files[name].SOPInstanceUID] for name in STUDIES}
    assert [by_name[n]["status"] for n in STUDIES] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert by_name["lateral.dcm"]["reason"].startswith("not_frontal")
    assert by_name["abdomen.dcm"]["reason"].startswith("out_of_scope")

    # Sending the same studies again adds nothing: no new row, no new object in the PACS.
    received_before = (out / "received.csv").read_text().count("\n")
    _store_to_node(pacs, ids)
    _wait_for(lambda: (out / "received.csv").read_text().count("\n") == received_before + 5, "second send answered", node)
    time.sleep(2.0)  # a batch the duplicates would have caused has run by now
    assert _results_by_study(pacs) == expected
    assert len(_rows(out)) == 5
    with open(out / "received.csv", newline="") as f:
        outcomes = [r["outcome"] for r in csv.DictReader(f)]
    assert outcomes == ["stored"] * 5 + ["duplicate"] * 5
    assert not any((out / "inbox").iterdir())

    assert node.stop() == 0  # SIGTERM: a clean stop
    # No patient's name or ID reached the node's console.
    for secret in [*PATIENT_NAMES, *PATIENT_IDS, "SECRETNAME", "SECRETDOCTOR", "19600101"]:
        assert secret not in node.output
    assert "5 instances stored, 5 duplicates, 0 refused" in node.output


def test_kill_9_mid_batch_then_restart_loses_and_duplicates_nothing(orthanc, study_files, node_checkpoint, tmp_path,
                                                                   nodes):
    pacs = orthanc(modalities={"agcnn": ("AGCNN", 1)})
    names = []
    files = {}
    for k in range(3):  # nine frontal chest films, each its own study, and the two the gate skips (x3)
        got = study_files(tmp_path / f"studies{k}")
        files.update({f"{k}/{n}": ds for n, ds in got.items()})
        names += [f"studies{k}/{n}" for n in got]
    ids = _upload(pacs, tmp_path, names)
    out = tmp_path / "node"
    node = nodes(node_checkpoint, out, pacs, "--batch-size", "1")
    _store_to_node(pacs, ids)  # every instance answered Success: durably in the inbox

    journal = out / "predictions.jsonl"
    lines = lambda: journal.read_text().count("\n") if journal.exists() else 0  # noqa: E731
    _wait_for(lambda: lines() >= 1, "the first batch", node)
    node.kill9()
    rows_at_kill = lines()
    assert rows_at_kill < 15, "the node finished before the kill; the test did not interrupt it"
    assert len(list((out / "inbox").iterdir())) + rows_at_kill >= 15  # nothing received was lost

    node = nodes(node_checkpoint, out, pacs, "--batch-size", "4")
    frontal = [ds for key, ds in files.items() if STUDIES[key.split("/")[1]][1]]
    expected = {ds.StudyInstanceUID: sorted([ds.SOPClassUID, SR_CLASS, SC_CLASS]) for ds in frontal}

    def all_back():
        got = _results_by_study(pacs)
        return all(got.get(study) == classes for study, classes in expected.items())

    _wait_for(all_back, "every frontal study's SR and capture after the restart", node)
    rows = _rows(out)
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(ds.SOPInstanceUID for ds in files.values())
    assert sum(r["status"] == "ok" for r in rows) == 9
    got = _results_by_study(pacs)
    assert sum(classes.count(SR_CLASS) for classes in got.values()) == 9
    assert not any((out / "inbox").iterdir())
    # The forward journal lists each result accepted once per file.
    with open(out / "sent.csv", newline="") as f:
        accepted = [r["path"] for r in csv.DictReader(f) if r["outcome"] == "accepted"]
    assert len(accepted) == 18

    # While it runs, a second node on the same folder is refused before it opens a port.
    second = subprocess.run([sys.executable, "-m", "agcnn", "serve", "--checkpoint", str(node_checkpoint), "--output",
                             str(out), "--port", "0", "--bind", "127.0.0.1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "another `agcnn serve` is using" in second.stderr
