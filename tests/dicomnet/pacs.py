"""A real PACS for the network tests: Orthanc on loopback, and the images it holds.

``orthanc(modalities=..., lua=...)`` starts ``Orthanc`` (Debian package ``orthanc``) with a
temporary configuration, index and storage folder, its REST API and DICOM port on free ports,
REST reachable from loopback only, and stores allowed only from the modalities it is given
(each at 127.0.0.1). Every server is stopped when its test ends; ``timeout`` bounds its lifetime
even if the test run itself is killed.

``study_files(folder)`` writes three frontal chest films, a lateral chest film and an abdomen
film with pydicom, each in a study of its own, with patient names the logs must never show.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
LIFETIME_S = 600  # an Orthanc a killed test run leaves behind ends by itself
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One running Orthanc: its REST API (``get``, ``post``, ``put``) and DICOM address."""

    def __init__(self, folder: Path, *, modalities: dict[str, tuple[str, int]], lua: str | None):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config: dict[str, Any] = {
            "Name": "agcnn-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,  # REST from loopback only
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False,  # only the modalities below may store ...
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,  # ... and only from 127.0.0.1
            "DicomCheckCalledAet": True,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()},
            "DicomScuTimeout": 30,
            "Plugins": [],
            "ConcurrentJobs": 1,
            "StableAge": 1,
            "LuaScripts": [],
        }
        if lua:
            (folder / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(folder / "filter.lua")]
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["timeout", "-s", "KILL", str(LIFETIME_S), ORTHANC, str(folder / "orthanc.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start:\n{(folder / 'orthanc.log').read_text()[-3000:]}")
                time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def _call(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: bytes | dict | list) -> Any:
        return self._call("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())

    def put(self, path: str, body: dict) -> Any:
        return self._call("PUT", path, json.dumps(body).encode())

    def upload(self, path: Path) -> str:
        """Store a file through the REST API; its Orthanc instance ID."""
        return self.post("/instances", path.read_bytes())["ID"]

    def set_modality(self, name: str, aet: str, port: int) -> None:
        self.put(f"/modalities/{name}", {"AET": aet, "Host": "127.0.0.1", "Port": port})

    def instances_by_study(self) -> dict[str, list[dict[str, str]]]:
        """StudyInstanceUID -> the main tags of each of its instances (Modality, SOPClassUID, ...)."""
        out: dict[str, list[dict[str, str]]] = {}
        for study in self.get("/studies?expand"):
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            tags = []
            for inst in self.get(f"/studies/{study['ID']}/instances"):
                simple = self.get(f"/instances/{inst['ID']}/simplified-tags")
                tags.append({k: simple.get(k, "") for k in ("Modality", "SOPClassUID", "SOPInstanceUID")})
            out[uid] = tags
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def orthanc(tmp_path) -> Iterator[Callable[..., Orthanc]]:
    """``orthanc(modalities={name: (AE, port)}, lua=None)`` -> a running :class:`Orthanc`."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`); the real-PACS tests need it")
    if shutil.which("timeout") is None:
        pytest.skip("coreutils `timeout` is missing; it bounds the test PACS's lifetime")
    started: list[Orthanc] = []

    def start(modalities: dict[str, tuple[str, int]] | None = None, lua: str | None = None) -> Orthanc:
        folder = tmp_path / f"orthanc{len(started)}"
        folder.mkdir()
        server = Orthanc(folder, modalities=modalities or {}, lua=lua)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------------- images

# The first has no caret: highdicom warns about such a name, quoting it.
PATIENT_NAMES = ["SECRETNAME ALPHA", "SECRETNAME^BRAVO", "SECRETNAME^CHARLIE", "SECRETNAME^DELTA", "SECRETNAME^ECHO"]
PATIENT_IDS = ["PID-SECRET-1", "PID-SECRET-2", "PID-SECRET-3", "PID-SECRET-4", "PID-SECRET-5"]
# file name -> (extra header attributes, whether agcnn predicts it)
STUDIES = {
    "chest1.dcm": ({"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, True),
    "chest2.dcm": ({"BodyPartExamined": "CHEST", "ViewPosition": "AP"}, True),
    "chest3.dcm": ({"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, True),
    "lateral.dcm": ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}, False),
    "abdomen.dcm": ({"BodyPartExamined": "ABDOMEN", "ViewPosition": "AP"}, False),
}


def _pixels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = 96, 80
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) / (2 * (0.15 * h) ** 2))
    return (blob * 3000 + rng.integers(0, 800, (h, w))).astype(np.uint16)


@pytest.fixture
def study_files() -> Callable[[Path], dict[str, Any]]:
    """``study_files(folder)`` -> {file name: its dataset}: the five films of :data:`STUDIES`."""
    from agcnn.data.dicom_write import write_dicom

    def write(folder: Path) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for i, (name, (tags, _)) in enumerate(STUDIES.items()):
            out[name] = write_dicom(folder / name, _pixels(i), modality="DX", patient_name=PATIENT_NAMES[i],
                                    patient_id=PATIENT_IDS[i], ReferringPhysicianName="SECRETDOCTOR",
                                    PatientBirthDate="19600101", **tags)
        return out

    return write


@pytest.fixture(scope="session")
def node_checkpoint(untrained_checkpoint, tmp_path_factory) -> Path:
    """The shared small untrained checkpoint, with fusion operating points (the tests check the
    plumbing, not the model)."""
    from agcnn.labels import LABELS

    return untrained_checkpoint(tmp_path_factory.mktemp("node-ckpt") / "model.pt",
                                operating_points={"fusion": [0.5] * len(LABELS)})


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child is killed when the test process dies (Linux), so a
    killed test run leaves no node or PACS behind."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
