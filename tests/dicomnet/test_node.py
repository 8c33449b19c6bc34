"""``agcnn serve`` in this process, spoken to with pynetdicom: echo, who may connect, what is
refused with which status (each with its row), duplicates, the inbox's bound."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from agcnn.cli import main
from agcnn.dicomnet.address import server_tls
from agcnn.dicomnet.serve import RECEIVED, Node, ServeOptions
from agcnn.errors import UsageError
from pacs import STUDIES, free_port


@pytest.fixture
def node(node_checkpoint, tmp_path):
    """``node(**options)`` -> (Node, port), running in a thread until the test ends."""
    running: list[tuple[Node, threading.Event, threading.Thread]] = []

    def start(**options) -> tuple[Node, int]:
        opts = dict(checkpoint=node_checkpoint, output=tmp_path / "node", ae_title="AGCNN", port=0, bind="127.0.0.1",
                    allow_ae=("MODALITY",), device="cpu", batch_wait=0.0, workers=0)
        n = Node(ServeOptions(**{**opts, **options}))
        port = n.start()
        stop = threading.Event()
        t = threading.Thread(target=n.serve_forever, args=(stop,), daemon=True)
        t.start()
        running.append((n, stop, t))
        return n, port

    yield start
    for n, stop, t in running:
        stop.set()
        t.join(60)
        n.close()


def _associate(port: int, calling: str = "MODALITY", called: str = "AGCNN"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _received(node: Node) -> list[dict[str, str]]:
    with open(node.out / RECEIVED, newline="") as f:
        return list(csv.DictReader(f))


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_echo_and_calling_ae_titles(node):
    _, port = node()
    assoc = _associate(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    stranger = _associate(port, calling="STRANGER")
    assert stranger.is_rejected  # not in --allow-ae
    assert "Calling AE title not recognised" in stranger.acceptor.primitive.reason_str
    misdirected = _associate(port, called="SOMEONE")
    assert misdirected.is_rejected
    assert "Called AE title not recognised" in misdirected.acceptor.primitive.reason_str


def _truncated(path: Path) -> str:
    """A file whose data set ends inside its SOP Instance UID (a value length past the end); its UID."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        sop_class = DigitalXRayImageStorageForPresentation.encode().ljust(30, b"\0")
        f.write(b"\x08\x00\x16\x00UI" + len(sop_class).to_bytes(2, "little") + sop_class)
        f.write(b"\x08\x00\x18\x00UI\xff\x7f" + uid.encode())
    return uid


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID below, as the client encodes it
def test_stores_predicts_once_and_refuses_bad_data_sets_with_a_row(node, study_files, tmp_path):
    files = study_files(tmp_path / "studies")
    n, port = node()
    chest = dcmread(tmp_path / "studies" / "chest1.dcm")
    lateral = dcmread(tmp_path / "studies" / "lateral.dcm")
    bad_uid = dcmread(tmp_path / "studies" / "chest2.dcm")
    bad_uid.SOPInstanceUID = "1.2.840.x.9"  # not a UID: would also be a file name in the inbox
    assoc = _associate(port)
    assert assoc.send_c_store(chest).Status == 0x0000
    # Answered Success only once it is on disk: the inbox (or, already predicted, the journal) holds it.
    sop = chest.SOPInstanceUID
    assert (n.inbox / f"{sop}.dcm").exists() or f"{sop}.dcm" in n.done
    assert assoc.send_c_store(lateral).Status == 0x0000
    assert assoc.send_c_store(bad_uid).Status == 0xC000
    # A data set cut short: stored as received; predict gives it its row.
    truncated = _truncated(tmp_path / "truncated.dcm")
    assert assoc.send_c_store(tmp_path / "truncated.dcm").Status == 0x0000
    assoc.release()
    _wait_for(lambda: len(n.done) == 3)
    assoc = _associate(port)
    assert assoc.send_c_store(chest).Status == 0x0000  # again: Success, and nothing new
    assoc.release()

    rows = _received(n)
    assert [(r["outcome"], r["status"]) for r in rows] == [
        ("stored", "0x0000"), ("stored", "0x0000"), ("refused", "0xC000"), ("stored", "0x0000"), ("duplicate", "0x0000")]
    assert "no valid SOP Instance UID" in rows[2]["reason"]
    assert rows[0]["calling_ae"] == "MODALITY" and rows[0]["sop_instance_uid"] == sop
    with open(n.out / "predictions.csv", newline="") as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    assert sorted(predicted) == sorted([f"{sop}.dcm", f"{lateral.SOPInstanceUID}.dcm", f"{truncated}.dcm"])
    cut = predicted[f"{truncated}.dcm"]
    assert (cut["status"], cut["reason"].split(":")[0]) == ("failed", "truncated")
    assert predicted[f"{sop}.dcm"]["status"] == "ok"
    assert predicted[f"{lateral.SOPInstanceUID}.dcm"]["reason"].startswith("not_frontal")
    # The scope gate: an SR and a capture for the frontal film, none for the lateral one.
    assert sorted(p.name for p in n.results.iterdir()) == [f"{sop}.dcm.sc.dcm", f"{sop}.dcm.sr.dcm"]
    sr = dcmread(n.results / f"{sop}.dcm.sr.dcm")
    assert sr.StudyInstanceUID == files["chest1.dcm"].StudyInstanceUID
    _wait_for(lambda: not any(n.inbox.iterdir()))  # predicted instances leave the inbox


def test_inbox_limit_refuses_with_out_of_resources(node, study_files, tmp_path):
    study_files(tmp_path / "studies")
    n, port = node(inbox_limit=1000)
    chest = dcmread(tmp_path / "studies" / "chest1.dcm")
    assoc = _associate(port)
    assert assoc.send_c_store(chest).Status == 0xA700
    assoc.release()
    row = _received(n)[-1]
    assert (row["outcome"], row["status"]) == ("refused", "0xA700")
    assert "--inbox-limit 1000" in row["reason"]
    assert not any(n.inbox.iterdir())


def test_another_checkpoint_on_the_same_folder_is_refused_at_start(node_checkpoint, untrained_checkpoint, tmp_path):
    out = tmp_path / "node"
    (out).mkdir()
    (out / ".predict-state.json").write_text('{"checkpoint_sha256": "0123456789abcdef"}')
    with pytest.raises(UsageError, match="holds the results of another checkpoint"):
        Node(ServeOptions(checkpoint=node_checkpoint, output=out, port=0, device="cpu"))


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; the TLS test makes its certificates with it")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_node_accepts_a_send_that_trusts_its_certificate(node, study_files, tmp_path, capsys):
    study_files(tmp_path / "studies")
    cert, key = _certificate(tmp_path, "node")
    other, _ = _certificate(tmp_path, "other")
    n, port = node(tls=server_tls(cert=str(cert), key=str(key)))
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    shutil.copy(tmp_path / "studies" / "chest1.dcm", outbox / "chest1.dcm")
    to = ["--to", f"AGCNN@127.0.0.1:{port}", "--ae-title", "MODALITY", "--retries", "0", "--timeout", "10"]

    # Without TLS, or with TLS that trusts another certificate: no association, nothing stored.
    assert main(["send", str(outbox), *to]) == 1
    assert "closed the connection without an association" in capsys.readouterr().err
    assert main(["send", str(outbox), *to, "--tls-ca", str(other)]) == 1
    assert "1 failed" in capsys.readouterr().err
    assert not (n.out / RECEIVED).exists()

    assert main(["send", str(outbox), *to, "--tls-ca", str(cert)]) == 0
    assert "1 accepted now" in capsys.readouterr().err
    assert [r["outcome"] for r in _received(n)] == ["stored"]
    _wait_for(lambda: len(n.done) == 1)


def test_results_the_destination_missed_are_forwarded_when_it_comes_back(node, study_files, tmp_path):
    from pynetdicom import AllStoragePresentationContexts, evt

    from agcnn.dicomnet.address import Destination
    from agcnn.dicomnet.send import SendSettings
    study_files(tmp_path / "studies")
    port_sink = free_port()
    n, port = node(forward=Destination("SINK", "127.0.0.1", port_sink), forward_every=0.5,
                   forward_settings=SendSettings(calling_ae="AGCNN", timeout=5, retries=0))
    assoc = _associate(port)
    assert assoc.send_c_store(dcmread(tmp_path / "studies" / "chest1.dcm")).Status == 0x0000
    assoc.release()
    sent = n.out / "sent.csv"
    _wait_for(lambda: sent.exists() and "failed" in sent.read_text())  # nobody listens yet

    got: list[str] = []
    sink = AE(ae_title="SINK")
    sink.supported_contexts = AllStoragePresentationContexts
    server = sink.start_server(("127.0.0.1", port_sink), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append(e.dataset.Modality) or 0x0000)])
    try:
        _wait_for(lambda: len(got) == 2)
    finally:
        server.shutdown()
    assert got.count("SR") == 1  # the SR, and the capture beside it
    with open(sent, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows if r["outcome"] == "accepted") == sorted(p.name for p in n.results.iterdir())


def test_a_backlog_is_predicted_and_forwarded_a_chunk_at_a_time(node_checkpoint, study_files, tmp_path, monkeypatch):
    from agcnn.dicomnet import serve

    # What a restart finds: instances received (durably, answered Success) but not yet predicted.
    out = tmp_path / "node"
    (out / serve.INBOX).mkdir(parents=True)
    for name in study_files(tmp_path / "studies"):
        shutil.copy(tmp_path / "studies" / name, out / serve.INBOX / name)
    monkeypatch.setattr(serve, "CHUNK", 2)
    n = Node(ServeOptions(checkpoint=node_checkpoint, output=out, ae_title="AGCNN", port=0, bind="127.0.0.1",
                          device="cpu", batch_wait=0.0, workers=0))
    forwarded_after: list[int] = []
    real_forward = n.forward
    monkeypatch.setattr(n, "forward", lambda: forwarded_after.append(len(n.done)) or real_forward())
    try:
        n.cycle()
    finally:
        n.close()
    # 5 instances, 2 a pass: the results of each pass were sent on before the next pass began.
    assert forwarded_after == [2, 4, 5]
    assert list((out / serve.INBOX).iterdir()) == []
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(STUDIES)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
