"""``agcnn send DIR --to AE@HOST:PORT``: C-STORE the DICOM objects under DIR to a PACS.

    agcnn send results/ --to PACS@pacs.hospital.org:104 --ae-title AGCNN

Every DICOM file under ``DIR`` (recursively; hidden files and the journal skipped) is sent
with the C-STORE service (pynetdicom), each over an association that proposes its SOP class
in its transfer syntax (and, for an uncompressed one, both little-endian syntaxes, so either
can be accepted). The outcome of each file is appended to the journal ``DIR/sent.csv``
(``--journal``) with the DICOM status the destination answered, one fsync'd line per file; a
re-run sends only what that destination has not accepted yet (and a file rewritten since it was
accepted: its modification time is journalled with it).

* ``accepted`` -- status Success (0x0000) or a Warning (0xB000 coercion, 0xB006, 0xB007);
* ``refused`` -- a Failure status (0xA7xx out of resources, 0xA9xx, 0xCxxx, ...): the
  destination read the object and said no. Not retried in the same run (it would say no again);
* ``failed`` -- no status at all: the association was rejected or aborted, the connection
  timed out, no presentation context was accepted. Retried ``--retries`` times, ``--retry-wait``
  seconds apart.

Exit status: 0 every object is accepted (now or by an earlier run), 1 some were refused or
failed (each is listed with its status), 2 a usage error (bad ``--to``, no such folder, TLS
files that cannot be used), nothing sent.

Privacy: the console shows relative paths, DICOM status codes and their standard meaning; the
journal adds SOP Instance UIDs (the keys predictions.csv already holds) and the destination's
error comment, which a PACS fills in as it likes.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agcnn.argtypes import int_at_least, seconds
from agcnn.dicomnet.address import Destination, check_ae_title, client_tls, parse_destination
from agcnn.errors import EXIT_FAILED, EXIT_OK, UsageError
from agcnn.fileio import fsync_dir, utc_now

JOURNAL_NAME = "sent.csv"
JOURNAL_COLUMNS = ["time", "destination", "path", "sop_instance_uid", "file_mtime_ns", "outcome", "status", "meaning"]
# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255, so at most 128 per association.
MAX_CONTEXTS = 128
DEFAULT_AE_TITLE = "AGCNN"
SHOWN = 20  # refused / failed objects listed on the console; the journal has them all

log = logging.getLogger("agcnn.send")


@dataclass
class SendSettings:
    """How associations are opened: the calling AE title, timeouts, retries, TLS."""

    calling_ae: str = DEFAULT_AE_TITLE
    timeout: float = 30.0  # seconds, for the connection, each association step and each C-STORE response
    retries: int = 2  # further attempts at the objects whose association failed
    retry_wait: float = 5.0
    tls: ssl.SSLContext | None = None


@dataclass
class Outcome:
    """What became of one file."""

    path: str
    sop_instance_uid: str
    outcome: str  # accepted, refused or failed
    status: int | None = None  # the DICOM status the destination answered; None: no answer
    meaning: str = ""  # the status's standard meaning, or what went wrong
    comment: str = ""  # the destination's Error Comment: to the journal only (a PACS writes what it likes)

    def describe(self) -> str:
        code = f"status 0x{self.status:04X} " if self.status is not None else ""
        return f"{self.path}: {self.outcome}, {code}{self.meaning}".rstrip(", ")


@dataclass
class SendSummary:
    destination: Destination
    objects: int = 0  # DICOM objects found under the folder
    accepted_before: int = 0  # accepted by an earlier run: not sent again
    accepted: list[Outcome] = field(default_factory=list)
    refused: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    not_dicom: list[str] = field(default_factory=list)  # files that are not DICOM: listed, not sent
    journal: Path | None = None

    @property
    def all_accepted(self) -> bool:
        return not self.refused and not self.failed

    def line(self) -> str:
        text = (f"agcnn send: {self.objects} DICOM objects for {self.destination}: {len(self.accepted)} accepted now, "
                f"{self.accepted_before} accepted before, {len(self.refused)} refused, {len(self.failed)} failed")
        if self.not_dicom:
            text += f"; {len(self.not_dicom)} files are not DICOM and were not sent"
        return text


# ---------------------------------------------------------------------- the journal

class SentJournal:
    """``sent.csv``: one line per attempt, appended and fsync'd; the last line of a file wins.

    A line cut off by a kill is dropped when the journal is opened, like the predict journal's.
    """

    def __init__(self, path: Path):
        self.path = path
        # (destination, path) -> (sop_instance_uid, file_mtime_ns) of its last accepted send;
        # a later refused or failed line for the same file does not undo an acceptance.
        self.accepted: dict[tuple[str, str], tuple[str, str]] = {}
        self._recover()

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(self.path, "rb+") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            data = data[:keep]
        reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
        if reader.fieldnames and [c for c in JOURNAL_COLUMNS if c not in reader.fieldnames]:
            raise UsageError(f"{self.path} is not an agcnn send journal (columns {reader.fieldnames}); "
                             f"pass another --journal or move that file away")
        for row in reader:
            if row.get("outcome") == "accepted":
                self.accepted[(row["destination"], row["path"])] = (row["sop_instance_uid"], row["file_mtime_ns"])

    def is_accepted(self, destination: Destination, rel: str, mtime_ns: int) -> bool:
        """Accepted, and the file unchanged since (same modification time)."""
        got = self.accepted.get((str(destination), rel))
        return got is not None and got[1] == str(mtime_ns)

    def append(self, destination: Destination, outcomes: Sequence[Outcome], mtimes: dict[str, int]) -> None:
        if not outcomes:
            return
        new = not self.path.exists()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if new:
            writer.writerow(JOURNAL_COLUMNS)
        now = utc_now()
        for o in outcomes:
            writer.writerow([now, str(destination), o.path, o.sop_instance_uid, mtimes.get(o.path, ""), o.outcome,
                             "" if o.status is None else f"0x{o.status:04X}",
                             f"{o.meaning} ({o.comment})" if o.comment else o.meaning])
            if o.outcome == "accepted":
                self.accepted[(str(destination), o.path)] = (o.sop_instance_uid, str(mtimes.get(o.path, "")))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path.parent)


# ---------------------------------------------------------------------- the objects

@dataclass
class DicomObject:
    path: str  # relative to the folder, /-separated
    full: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    mtime_ns: int


def list_files(folder: Path, *, exclude: Sequence[Path] = ()) -> list[tuple[str, Path]]:
    """The files under ``folder`` as sorted (relative path, path); hidden ones (a writer's
    temporary files) and ``exclude`` left out."""
    skip = {os.path.abspath(p) for p in exclude}
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name.startswith(".") or os.path.abspath(full) in skip:
                continue
            out.append((os.path.relpath(full, folder).replace(os.sep, "/"), Path(full)))
    return sorted(out)


def read_object(rel: str, full: Path, mtime_ns: int) -> DicomObject | None:
    """The header facts a C-STORE needs; None when the file is not a DICOM object."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(full, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError):
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    sop_instance = str(ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else "") or "")
    ts = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not (sop_class and sop_instance and ts):
        return None
    return DicomObject(rel, full, sop_class, sop_instance, ts, mtime_ns)


# ---------------------------------------------------------------------- sending

def status_meaning(code: int) -> str:
    """The standard meaning of a C-STORE status (PS3.4 B.2.3, PS3.7 C)."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

    category = code_to_category(code)
    text = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, ""))[1]
    return f"{category}: {text}" if text else category


def send_folder(folder: str | os.PathLike[str], destination: Destination, settings: SendSettings | None = None, *,
                journal: str | os.PathLike[str] | None = None) -> SendSummary:
    """Send every DICOM object under ``folder`` that ``destination`` has not accepted yet.

    Raises :class:`UsageError` when the folder does not exist; everything that happens on the
    network is in the summary (and the journal), never an exception.
    """
    settings = settings or SendSettings()
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{str(folder)!r} is not a folder; pass the folder that holds the DICOM objects "
                         f"(e.g. the --dicom-out folder of agcnn predict)")
    journal_path = Path(journal) if journal is not None else folder / JOURNAL_NAME
    sent = SentJournal(journal_path)
    summary = SendSummary(destination, journal=journal_path)
    pending: list[DicomObject] = []
    for rel, full in list_files(folder, exclude=[journal_path]):
        try:
            mtime = full.stat().st_mtime_ns
        except OSError:
            continue  # gone since the listing
        if sent.is_accepted(destination, rel, mtime):
            summary.objects += 1
            summary.accepted_before += 1
            continue
        obj = read_object(rel, full, mtime)
        if obj is None:
            summary.not_dicom.append(rel)
            continue
        summary.objects += 1
        pending.append(obj)
    mtimes = {o.path: o.mtime_ns for o in pending}

    for attempt in range(settings.retries + 1):
        if not pending:
            break
        if attempt:
            log.warning("agcnn send: %d objects not sent (%s); trying again in %g s (attempt %d of %d)", len(pending),
                        _first_reason(summary.failed), settings.retry_wait, attempt + 1, settings.retries + 1)
            time.sleep(settings.retry_wait)
        retry: list[DicomObject] = []
        summary.failed = [o for o in summary.failed if o.path not in {p.path for p in pending}]
        for chunk in _chunks(pending):
            outcomes, again = _send_chunk(chunk, destination, settings)
            sent.append(destination, outcomes, mtimes)
            for o in outcomes:
                {"accepted": summary.accepted, "refused": summary.refused, "failed": summary.failed}[o.outcome].append(o)
            retry += again
        pending = retry
    return summary


def _first_reason(failed: Sequence[Outcome]) -> str:
    return failed[-1].meaning if failed else "no answer"


def _context_key(obj: DicomObject) -> tuple[str, str]:
    from pydicom.uid import UID

    ts = UID(obj.transfer_syntax)
    # An uncompressed object can go in any uncompressed syntax (pynetdicom re-encodes it); a
    # compressed one only in its own: it is sent as it is, never transcoded.
    return obj.sop_class_uid, ("native" if not ts.is_compressed else obj.transfer_syntax)


def _chunks(objects: Sequence[DicomObject]) -> list[list[DicomObject]]:
    """Groups of objects whose presentation contexts fit one association."""
    chunks: list[list[DicomObject]] = []
    keys: set[tuple[str, str]] = set()
    for obj in objects:
        key = _context_key(obj)
        if not chunks or (key not in keys and len(keys) >= MAX_CONTEXTS):
            chunks.append([])
            keys = set()
        keys.add(key)
        chunks[-1].append(obj)
    return chunks


def _send_chunk(chunk: Sequence[DicomObject], destination: Destination,
                settings: SendSettings) -> tuple[list[Outcome], list[DicomObject]]:
    """One association: (the outcome of each object sent, the objects to try again)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.status import code_to_category

    ae = AE(ae_title=settings.calling_ae)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, settings.timeout)
    for sop_class, ts in sorted({_context_key(o) for o in chunk}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian] if ts == "native" else [ts])
    connected: list[bool] = []
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=(settings.tls, destination.host) if settings.tls is not None else None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
    except (OSError, ValueError, RuntimeError) as e:
        return _all_failed(chunk, f"cannot connect to {destination}: {e}")
    if not assoc.is_established:
        reason = _association_failure(assoc, destination, connected=bool(connected))
        return [_failed(o, reason) for o in chunk], list(chunk)

    outcomes: list[Outcome] = []
    again: list[DicomObject] = []
    try:
        for i, obj in enumerate(chunk):
            if not assoc.is_established:
                reason = "the association was aborted by the destination or the network"
                outcomes += [_failed(o, reason) for o in chunk[i:]]
                again += chunk[i:]
                break
            try:
                ds = dcmread(obj.full)
            except Exception as e:  # noqa: BLE001 - a file that changed or broke since it was listed
                outcomes.append(Outcome(obj.path, obj.sop_instance_uid, "failed", None,
                                        f"cannot be read ({type(e).__name__}); not sent"))
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:
                # No accepted presentation context for this SOP class / transfer syntax.
                outcomes.append(Outcome(obj.path, obj.sop_instance_uid, "failed", None,
                                        f"the destination accepted no presentation context for it ({e})"))
                continue
            except RuntimeError:
                outcomes.append(_failed(obj, "the association ended before the object was sent"))
                again.append(obj)
                continue
            if "Status" not in status:
                outcomes.append(_failed(obj, f"no C-STORE response within {settings.timeout:g} s, or the association was aborted"))
                again.append(obj)
                continue
            code = int(status.Status)
            category = code_to_category(code)
            outcome = "accepted" if category in ("Success", "Warning") else "refused"
            outcomes.append(Outcome(obj.path, obj.sop_instance_uid, outcome, code, status_meaning(code),
                                    str(status.get("ErrorComment", "") or "")))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes, again


def _failed(obj: DicomObject, reason: str) -> Outcome:
    return Outcome(obj.path, obj.sop_instance_uid, "failed", None, reason)


def _all_failed(chunk: Sequence[DicomObject], reason: str) -> tuple[list[Outcome], list[DicomObject]]:
    return [_failed(o, reason) for o in chunk], list(chunk)


def _association_failure(assoc, destination: Destination, *, connected: bool) -> str:
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        detail = f" ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})" if rsp is not None else ""
        return f"the association was rejected by {destination}{detail}; check the calling AE title and its registration there"
    if not connected:
        return (f"cannot connect to {destination.host}:{destination.port} (nothing listens there, the host name "
                f"does not resolve, or a firewall drops it)")
    if not assoc.accepted_contexts and assoc.rejected_contexts:
        return f"{destination} accepted none of the proposed SOP classes / transfer syntaxes"
    return (f"{destination} closed the connection without an association (TLS on one side only, a certificate "
            f"it or this node does not trust, or no answer within the timeout)")


# ---------------------------------------------------------------------- the command line

def add_connection_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Timeout and retries of outgoing associations (``prefix``: ``forward-`` for agcnn serve)."""
    parser.add_argument(f"--{prefix}timeout", type=seconds(allow_zero=False), default=30.0, metavar="S",
                        help="seconds to wait for the connection, each association step and each answer (default 30)")
    parser.add_argument(f"--{prefix}retries", type=int_at_least(0), default=2, metavar="N",
                        help="further attempts at objects whose association failed (default 2)")
    parser.add_argument(f"--{prefix}retry-wait", type=seconds(allow_zero=False), default=5.0, metavar="S",
                        help="seconds between attempts (default 5)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Each file's outcome and DICOM status go to DIR/sent.csv; a re-run sends only what the destination\n"
        "has not accepted. Exit status: 0 all accepted, 1 some refused or failed, 2 usage error (nothing sent)."
    )
    parser.add_argument("folder", metavar="DIR", help="folder of DICOM objects, e.g. the --dicom-out folder of agcnn predict")
    parser.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the destination, e.g. PACS@pacs.hospital.org:104")
    parser.add_argument("--ae-title", default=DEFAULT_AE_TITLE, metavar="AE",
                        help=f"calling AE title: how the destination knows this node (default {DEFAULT_AE_TITLE})")
    add_connection_arguments(parser)
    parser.add_argument("--journal", default=None, metavar="CSV", help=f"the journal of sent objects (default DIR/{JOURNAL_NAME})")
    tls = parser.add_argument_group("TLS (DICOM PS3.15 B.1); on when any of these is given")
    tls.add_argument("--tls", action="store_true", help="use TLS, verifying the destination against the system's CAs")
    tls.add_argument("--tls-ca", metavar="PEM", help="CA certificates the destination's certificate is verified against")
    tls.add_argument("--tls-cert", metavar="PEM", help="this node's certificate, for a destination that asks for one")
    tls.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")


def settings_from(args: argparse.Namespace, *, prefix: str = "", calling_ae: str,
                  tls: ssl.SSLContext | None = None) -> SendSettings:
    get = lambda name: getattr(args, (prefix + name).replace("-", "_"))  # noqa: E731
    return SendSettings(calling_ae=check_ae_title(calling_ae, "--ae-title"), timeout=get("timeout"),
                        retries=get("retries"), retry_wait=get("retry-wait"), tls=tls)


def quiet_pynetdicom(args: argparse.Namespace, level: int) -> None:
    """pynetdicom logs each rejection or abort itself; the summary says the same once, with the fix."""
    if not getattr(args, "debug", False) and os.environ.get("AGCNN_DEBUG", "") in ("", "0"):
        logging.getLogger("pynetdicom").setLevel(level)


def run(args: argparse.Namespace) -> int:
    quiet_pynetdicom(args, logging.CRITICAL)
    destination = parse_destination(args.to, "--to")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = client_tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    settings = settings_from(args, calling_ae=args.ae_title, tls=tls)
    summary = send_folder(args.folder, destination, settings, journal=args.journal)
    problems = summary.refused + summary.failed
    for o in problems[:SHOWN]:
        print(f"agcnn send: {o.describe()}", file=sys.stderr)
    if len(problems) > SHOWN:
        print(f"agcnn send: ... and {len(problems) - SHOWN} more (each with its status in {summary.journal})", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return EXIT_OK if summary.all_accepted else EXIT_FAILED
