"""``agcnn serve``: a DICOM node that predicts the images a PACS sends it, and sends the results back.

    agcnn serve --checkpoint model.pt --output /data/node --ae-title AGCNN --port 11112 \\
        --forward PACS@pacs.hospital.org:104 --allow-ae PACS

The node (a pynetdicom SCP) answers C-ECHO and accepts C-STORE of any storage SOP class in any
transfer syntax from the calling AE titles of ``--allow-ae`` (all, without it; the called AE
title must be ``--ae-title``). Each received instance is written, whole and as received, to
``OUT/inbox/<SOP Instance UID>.dcm`` -- into a temporary file, fsync'd, renamed, the folder
fsync'd -- *before* the node answers Success: once the sender has its Success the instance
survives a crash or a ``kill -9``. Then, in small batches (``--batch-wait`` seconds after the
first arrival, ``--batch-size`` images per model batch), the inbox is predicted with
:func:`agcnn.predict.predict` itself: the same decoding, scope gate (out-of-scope body parts
and non-frontal views get their row and no result, see :mod:`agcnn.data.scope`), rows in
``OUT/predictions.csv`` and, per predicted image, a Comprehensive SR and a Secondary Capture in
``OUT/results/`` (predict's ``--dicom-out``). With ``--forward`` these are sent with
:func:`agcnn.dicomnet.send.send_folder` (journal ``OUT/sent.csv``): they carry the source's
study, so they land in the same study in the PACS. A predicted instance leaves the inbox
once its row is in predict's journal.

Exactly one result per instance. The inbox is the journal of what was received and not yet
predicted, ``OUT/predictions.jsonl`` of what was predicted. An instance that arrives again
(same SOP Instance UID) while it waits in the inbox or after it was predicted is answered
Success and not stored or predicted again. After a ``kill -9`` the restarted node predicts what
its inbox holds (predict's journal makes that resume exactly), and sends whatever
``sent.csv`` does not list as accepted: an object sent just before the kill goes again with
the same SOP Instance UID, which a PACS stores once.

Refusals, each answered with a DICOM status and recorded in ``OUT/received.csv`` (one row per
C-STORE: time, calling AE title, SOP Instance / Class UID, outcome, status, reason):

* 0xC000 (cannot understand) -- a data set that does not decode, or without a valid SOP
  Instance UID (the UID names its file in the inbox);
* 0xA900 -- the data set's SOP Class UID is not the one the request announced;
* 0xA700 (out of resources) -- the inbox would grow past ``--inbox-limit``, or the disk is full;
* a calling AE title not in ``--allow-ae``: the association itself is rejected.

A data set that decodes far enough to name itself but is damaged further on (cut short, pixel
data a decoder rejects) is stored and gets predict's ``failed`` row with the reason.

The console and the logs show counts, AE titles, statuses and reasons: never a patient's name,
ID or date (the files in ``OUT/inbox`` and ``OUT/results`` hold them, like any DICOM file).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agcnn import libmessages
from agcnn.argtypes import int_at_least, seconds
from agcnn.dicomnet.address import (
    Destination,
    check_ae_title,
    check_port,
    client_tls,
    parse_destination,
    parse_size,
    server_tls,
)
from agcnn.dicomnet.send import SendSettings, add_connection_arguments, quiet_pynetdicom, send_folder, settings_from
from agcnn.errors import EXIT_OK, UsageError
from agcnn.fileio import fsync_dir, utc_now

INBOX = "inbox"
INBOX_TMP = ".inbox-tmp"  # beside the inbox, same filesystem: the rename into it is atomic
RESULTS = "results"
RECEIVED = "received.csv"
SENT = "sent.csv"
LOCK = ".serve.lock"
# Instances predicted per pass: a backlog (a restart, a burst of studies) is forwarded a chunk at
# a time instead of after the last instance is predicted.
CHUNK = 256
RECEIVED_COLUMNS = ["time", "calling_ae", "sop_instance_uid", "sop_class_uid", "outcome", "status", "reason"]

# C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_MATCHING_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Room the inbox keeps on its disk for predict's own outputs and the journals.
DISK_RESERVE = 256 << 20

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

log = logging.getLogger("agcnn.serve")


@dataclass
class ServeOptions:
    """Every option of a node; the command line maps onto it one to one."""

    checkpoint: str | os.PathLike[str]
    output: str | os.PathLike[str]
    ae_title: str = "AGCNN"
    port: int = 11112
    bind: str = "0.0.0.0"  # a DICOM node must be reachable by the PACS; tests bind 127.0.0.1
    forward: Destination | None = None
    forward_settings: SendSettings = field(default_factory=SendSettings)
    forward_every: float = 60.0  # seconds between attempts at results the destination did not accept
    allow_ae: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int = 8
    batch_wait: float = 2.0
    # Decoding in a worker process: a decoder that crashes on a malformed file costs that
    # file's row (predict isolates it), not the node.
    workers: int = 1
    inbox_limit: int = 10 << 30
    any_body_part: bool = False
    any_view: bool = False
    tls: ssl.SSLContext | None = None

    def check(self) -> ServeOptions:
        self.ae_title = check_ae_title(self.ae_title, "--ae-title")
        self.allow_ae = tuple(check_ae_title(a, "--allow-ae") for a in self.allow_ae)
        self.port = check_port(self.port, "--port", allow_zero=True)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.batch_wait < 0:
            raise UsageError(f"--batch-wait {self.batch_wait} must be 0 seconds or more")
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers} must be 0 or more")
        if self.inbox_limit < 1:
            raise UsageError(f"--inbox-limit {self.inbox_limit} must be at least one byte, e.g. 10G")
        return self


class ReceivedLog:
    """``received.csv``: one fsync'd row per C-STORE the node answered."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):  # a row cut off by a kill
                with open(path, "rb+") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())

    def add(self, calling_ae: str, sop_instance: str, sop_class: str, outcome: str, status: int, reason: str = "") -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        with self._lock:
            new = not self.path.exists() or self.path.stat().st_size == 0
            if new:
                writer.writerow(RECEIVED_COLUMNS)
            writer.writerow([utc_now(), calling_ae, sop_instance, sop_class, outcome, f"0x{status:04X}", reason])
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())


class Node:
    """The node's state: folders, model, inbox accounting; :meth:`start` opens the port."""

    def __init__(self, options: ServeOptions):
        from agcnn.predict import PredictOptions
        from agcnn.predict.journal import check_writable
        from agcnn.predict.run import load_model

        self.options = options.check()
        self.out = Path(options.output)
        check_writable(self.out)
        self._lock_file = _lock(self.out / LOCK)
        # Once, on its device: a bad checkpoint or --device fails now, not at the first image.
        self.loaded = load_model(options.checkpoint, options.device)
        self._check_state()
        self.inbox, self.tmp, self.results = self.out / INBOX, self.out / INBOX_TMP, self.out / RESULTS
        for folder in (self.inbox, self.tmp, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # writes a kill interrupted: never answered Success
            with contextlib.suppress(OSError):
                stale.unlink()
        self.received = ReceivedLog(self.out / RECEIVED)
        self.predict_options = PredictOptions(
            checkpoint=options.checkpoint, input=self.inbox, output=self.out, device=options.device,
            batch_size=options.batch_size, workers=options.workers, progress=False,
            any_body_part=options.any_body_part, any_view=options.any_view, dicom_out=self.results, limit=CHUNK,
        )
        self._state = threading.Lock()  # guards done, writing, usage
        self.done: set[str] = self._read_done()
        self.writing: set[str] = set()
        self.usage = sum(p.stat().st_size for p in self.inbox.iterdir() if p.is_file())
        self.wake = threading.Event()
        self.server = None
        self.retry_due: float | None = None  # when to try again what a cycle could not finish
        self.counts = {"stored": 0, "duplicate": 0, "refused": 0}

    def _check_state(self) -> None:
        """Refuse at start-up, not at the first image, a folder that predict would refuse."""
        from agcnn.predict.journal import STATE

        path = self.out / STATE
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except ValueError:
            return  # predict names the damage itself
        if old.get("checkpoint_sha256") != self.loaded.sha256:
            raise UsageError(f"{str(self.out)!r} holds the results of another checkpoint; pass another --output, "
                             f"or the checkpoint that started it")
        scope = {"any_body_part": self.options.any_body_part, "any_view": self.options.any_view}
        changed = {k: v for k, v in scope.items() if (old.get("options") or {}).get(k, v) != v}
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {'given' if v else 'not given'}" for k, v in changed.items())
            raise UsageError(f"{str(self.out)!r} was started with other scope options ({flags} now); "
                             f"use the same options, or another --output")

    # ------------------------------------------------------------------ receiving

    def start(self) -> int:
        """Open the port; returns the port bound (``--port 0``: one the system chose)."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        o = self.options
        ae = AE(ae_title=o.ae_title)
        ae.require_called_aet = True
        if o.allow_ae:
            ae.require_calling_aet = list(o.allow_ae)
        for cx in AllStoragePresentationContexts:
            # Any transfer syntax: the instance is stored as received and decoded by predict's
            # readers (JPEG, JPEG-LS, JPEG 2000, RLE, deflate), never transcoded here.
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 16
        try:
            self.server = ae.start_server((o.bind, o.port), block=False, ssl_context=o.tls,
                                          evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        except OSError as e:
            raise UsageError(f"--bind {o.bind} --port {o.port} cannot be opened ({e.strerror or e}); "
                             f"pick a free port, or stop the node that holds it") from None
        return int(self.server.server_address[1])

    def on_store(self, event) -> int:
        """C-STORE: store durably, then answer; every answer gets its row in received.csv."""
        calling = str(event.assoc.requestor.ae_title).strip()
        announced = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        try:
            ds = event.dataset
            sop = str(ds.get("SOPInstanceUID", "") or "").strip("\0 ")
            sop_class = str(ds.get("SOPClassUID", "") or "").strip("\0 ")
        except Exception as e:  # noqa: BLE001 - whatever a peer sends must not take the node down
            return self._refuse(calling, "", announced, CANNOT_UNDERSTAND,
                                f"the data set cannot be decoded ({type(e).__name__})")
        if not sop or len(sop) > 64 or not _UID.fullmatch(sop):
            return self._refuse(calling, "", sop_class, CANNOT_UNDERSTAND,
                                "no valid SOP Instance UID (digits and dots, at most 64 characters)")
        if announced and sop_class != announced:
            return self._refuse(calling, sop, sop_class, NOT_MATCHING_SOP_CLASS,
                                f"SOP Class UID {sop_class or 'missing'} is not the announced {announced}")
        rel = f"{sop}.dcm"
        try:
            data = event.encoded_dataset()
        except Exception as e:  # noqa: BLE001
            return self._refuse(calling, sop, sop_class, CANNOT_UNDERSTAND, f"the data set cannot be encoded ({type(e).__name__})")
        with self._state:
            if rel in self.done or rel in self.writing or (self.inbox / rel).exists():
                self.counts["duplicate"] += 1
                self.received.add(calling, sop, sop_class, "duplicate", SUCCESS, "already received; not stored again")
                return SUCCESS
            if self.usage + len(data) > self.options.inbox_limit:
                full = f"the inbox holds {self.usage} bytes; this instance ({len(data)} bytes) would pass --inbox-limit {self.options.inbox_limit}"
                return self._refuse(calling, sop, sop_class, OUT_OF_RESOURCES, full, locked=True)
            self.usage += len(data)
            self.writing.add(rel)
        try:
            free = shutil.disk_usage(self.inbox).free
            if free < len(data) + DISK_RESERVE:
                raise OSError(28, "the disk is full")
            self._write(rel, data)
        except OSError as e:
            with self._state:
                self.usage -= len(data)
                self.writing.discard(rel)
            return self._refuse(calling, sop, sop_class, OUT_OF_RESOURCES, f"cannot be stored ({e.strerror or e})")
        with self._state:
            self.writing.discard(rel)
            self.counts["stored"] += 1
        self.received.add(calling, sop, sop_class, "stored", SUCCESS)
        self.wake.set()
        return SUCCESS

    def _write(self, rel: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=rel + ".", suffix=".tmp", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.inbox / rel)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.inbox)

    def _refuse(self, calling: str, sop: str, sop_class: str, status: int, reason: str, *, locked: bool = False) -> int:
        if locked:
            self.counts["refused"] += 1
        else:
            with self._state:
                self.counts["refused"] += 1
        self.received.add(calling, sop, sop_class, "refused", status, reason)
        log.warning("agcnn serve: refused a C-STORE from %s with status 0x%04X: %s", calling, status, reason)
        return status

    # ------------------------------------------------------------------ predicting and forwarding

    def _read_done(self) -> set[str]:
        from agcnn.predict.journal import JOURNAL, Journal

        if not (self.out / JOURNAL).exists():
            return set()
        journal = Journal(self.out / JOURNAL)  # also cuts off a row a kill left half-written
        journal.close()
        return set(journal.done)

    def pending(self) -> list[str]:
        with self._state:
            return sorted(p.name for p in self.inbox.iterdir() if p.name not in self.done)

    def cycle(self, stop: threading.Event | None = None) -> None:
        """Predict what waits in the inbox, :data:`CHUNK` instances at a time, forwarding each
        chunk's results and emptying the inbox of what is done before the next, until nothing
        waits (or ``stop`` is set)."""
        from agcnn.predict import predict

        self.retry_due = None
        chunks = 0
        while self.pending():
            chunks += 1
            summary = predict(self.predict_options, loaded=self.loaded)
            c = summary.counts
            log.info("agcnn serve: %d instances predicted (all so far: %d ok, %d skipped, %d failed; %d waiting) -> %s",
                     summary.new_rows, c.get("ok", 0), c.get("skipped", 0), c.get("failed", 0), summary.left,
                     summary.out_dir / "predictions.csv")
            done = self._read_done()
            with self._state:
                self.done = done
            if self.retry_due is None:  # else the destination failed earlier in this cycle: its retry sends the rest
                self.forward()
            self._clean_inbox()
            if not summary.new_rows or (stop is not None and stop.is_set()):
                return  # what predict does not list (a file that is not one) is left in the inbox, as before
        if not chunks:  # woken to retry the forwarding
            self.forward()
            self._clean_inbox()

    def forward(self) -> None:
        o = self.options
        if o.forward is None:
            return
        summary = send_folder(self.results, o.forward, o.forward_settings, journal=self.out / SENT)
        sent = len(summary.accepted)
        if sent or summary.refused or summary.failed:
            log.info("agcnn serve: forwarded %d results to %s (%d refused, %d failed)", sent, o.forward,
                     len(summary.refused), len(summary.failed))
        for outcome in (summary.refused + summary.failed)[:5]:
            log.warning("agcnn serve: not forwarded: %s", outcome.describe())
        if not summary.all_accepted:
            self.retry_due = time.monotonic() + o.forward_every

    def _clean_inbox(self) -> None:
        with self._state:
            for name in [p.name for p in self.inbox.iterdir() if p.name in self.done]:
                path = self.inbox / name
                with contextlib.suppress(OSError):
                    size = path.stat().st_size
                    path.unlink()
                    self.usage -= size

    def serve_forever(self, stop: threading.Event) -> None:
        """Predict the backlog, then each batch as it arrives, until ``stop`` is set."""
        self._guarded(lambda: self.cycle(stop))
        while not stop.is_set():
            if self.wake.wait(timeout=0.5):
                # Let the rest of a study arrive, so its images share a model batch.
                stop.wait(self.options.batch_wait)
                self.wake.clear()
                self._guarded(lambda: self.cycle(stop))
            elif self.retry_due is not None and time.monotonic() >= self.retry_due:
                self._guarded(lambda: self.cycle(stop))

    def _guarded(self, step) -> None:
        try:
            step()
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - the node keeps receiving; the inbox keeps the work
            # The kind of error only (and an OSError's reason): a message about a header can quote its values.
            what = f"{type(e).__name__}: {e.strerror}" if isinstance(e, OSError) and e.strerror else type(e).__name__
            log.error("agcnn serve: a batch failed (%s); the inbox keeps its instances, tried again in %g s "
                      "(--debug shows the traceback)", what, self.options.forward_every)
            log.debug("agcnn serve: the batch's traceback", exc_info=True)
            self.retry_due = time.monotonic() + self.options.forward_every

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        with contextlib.suppress(OSError):
            self._lock_file.close()


def _lock(path: Path):
    """This process's lock on the node's folder (a record lock: not inherited by the decoding workers)."""
    from agcnn.predict.journal import hold_lock

    return hold_lock(path, f"another `agcnn serve` is using {str(path.parent)!r}; stop it or pass another --output")


# ---------------------------------------------------------------------- the command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes OUT/inbox (received, not yet predicted), OUT/predictions.csv, OUT/results (an SR and a Secondary\n"
        "Capture per predicted image; these carry the patient's identifiers), OUT/received.csv (one row per C-STORE,\n"
        "with its status) and with --forward OUT/sent.csv. Stops on SIGTERM or Ctrl-C; a restart resumes."
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by `agcnn train` (fusion stage)")
    parser.add_argument("--output", required=True, metavar="OUT", help="the node's folder: inbox, predictions, results, journals")
    parser.add_argument("--ae-title", default="AGCNN", metavar="AE", help="this node's AE title (default AGCNN); "
                        "also the calling AE title of --forward")
    parser.add_argument("--port", type=int, default=11112, help="TCP port to listen on (default 11112; 0: any free port)")
    parser.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS",
                        help="address to listen on (default 0.0.0.0, every interface; 127.0.0.1 for this machine only)")
    parser.add_argument("--allow-ae", nargs="+", default=[], metavar="AE",
                        help="accept associations only from these calling AE titles (default: any)")
    parser.add_argument("--forward", default=None, metavar="AE@HOST:PORT",
                        help="send each SR and Secondary Capture there (usually the PACS that sent the images)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per model batch (default 8)")
    parser.add_argument("--batch-wait", type=seconds(allow_zero=True), default=2.0, metavar="S",
                        help="seconds to wait after an arrival for the rest of the study (default 2)")
    parser.add_argument("--workers", type=int, default=1,
                        help="decoding processes (default 1: a decoder crash costs one row, not the node; 0: in the node)")
    parser.add_argument("--inbox-limit", default="10G", metavar="SIZE",
                        help="largest size the inbox of instances waiting for prediction may reach; beyond it C-STOREs "
                             "are refused with status 0xA700 (out of resources) (default 10G)")
    parser.add_argument("--any-body-part", action="store_true", help="also predict other body parts (as predict)")
    parser.add_argument("--any-view", action="store_true", help="also predict lateral, oblique and decubitus views (as predict)")
    add_connection_arguments(parser, prefix="forward-")
    tls = parser.add_argument_group("TLS (DICOM PS3.15 B.1)")
    tls.add_argument("--tls-cert", metavar="PEM", help="listen with TLS: this node's certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    tls.add_argument("--tls-ca", metavar="PEM", help="with --tls-cert: require client certificates from these CAs; with "
                     "--forward-tls: verify the destination against them")
    tls.add_argument("--forward-tls", action="store_true",
                     help="forward over TLS (verified against --tls-ca, else the system's CAs; --tls-cert as client certificate)")


def options_from(args: argparse.Namespace) -> ServeOptions:
    tls = None
    if args.tls_ca and not (args.tls_cert or args.forward_tls):
        raise UsageError("--tls-ca needs --tls-cert (listen with TLS and require client certificates) or "
                         "--forward-tls (verify the --forward destination)")
    if args.tls_cert or args.tls_key:
        if not args.tls_cert:
            raise UsageError("--tls-key needs --tls-cert (the certificate the key belongs to)")
        tls = server_tls(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    forward = parse_destination(args.forward, "--forward") if args.forward else None
    forward_tls = client_tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.forward_tls else None
    return ServeOptions(
        checkpoint=args.checkpoint, output=args.output, ae_title=args.ae_title, port=args.port, bind=args.bind,
        forward=forward, forward_settings=settings_from(args, prefix="forward-", calling_ae=args.ae_title, tls=forward_tls),
        allow_ae=tuple(args.allow_ae), device=args.device, batch_size=args.batch_size, batch_wait=args.batch_wait,
        workers=args.workers, inbox_limit=parse_size(args.inbox_limit, "--inbox-limit"),
        any_body_part=args.any_body_part, any_view=args.any_view, tls=tls,
    )


def withhold_library_texts() -> None:
    """Keep header values out of the node's console (a container log that hospitals keep).

    pydicom and highdicom quote the value they warn about -- a patient's or a physician's name
    that is "unlikely to represent the intended person name", a date that is not a date. The
    console shows each kind of warning once, with the library it came from, not its text;
    ``--debug`` shows everything.
    """
    import warnings

    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        parts = Path(str(filename)).parts
        source = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else Path(str(filename)).stem
        with lock:
            if (category.__name__, source) in seen:
                return
            seen.add((category.__name__, source))
        log.warning("agcnn serve: %s from %s (its text is not shown: it can quote header values; --debug shows it)",
                    category.__name__, source)

    warnings.showwarning = show
    # pydicom also logs what it warns about, value included; highdicom narrates each SR it builds.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    # pynetdicom's errors (a handler that failed, a data set it could not encode) come with their
    # tracebacks, which can quote header values: libmessages counts them, and this says where, now.
    lg = logging.getLogger("pynetdicom")
    if not any(isinstance(h, _KindOnly) for h in lg.handlers):
        lg.addHandler(_KindOnly(level=logging.ERROR))


class _KindOnly(logging.Handler):
    """A library's log record on the console by kind (library, level, place), never its text."""

    def emit(self, record: logging.LogRecord) -> None:
        log.error("agcnn serve: %s (its text is not shown: it can quote header values; --debug shows it)",
                  libmessages.log_kind(record))


def run(args: argparse.Namespace) -> int:
    # pynetdicom's errors (a handler that failed) stay visible; its per-association chatter does not.
    quiet_pynetdicom(args, logging.ERROR)
    if getattr(args, "debug", False) or os.environ.get("AGCNN_DEBUG", "") not in ("", "0"):
        log.setLevel(logging.DEBUG)
    else:
        withhold_library_texts()
    options = options_from(args)
    node = Node(options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = node.start()
        allowed = ", ".join(options.allow_ae) if options.allow_ae else "any"
        print(f"agcnn serve: {options.ae_title} listening on {options.bind}:{port}"
              f"{' (TLS)' if options.tls else ''}; calling AE titles: {allowed}; "
              f"forwarding to {options.forward or 'nowhere'}; folder {node.out}", file=sys.stderr, flush=True)
        node.serve_forever(stop)
    finally:
        node.close()
    c = node.counts
    print(f"agcnn serve: stopped; {c['stored']} instances stored, {c['duplicate']} duplicates, {c['refused']} refused "
          f"in this run", file=sys.stderr)
    return EXIT_OK
