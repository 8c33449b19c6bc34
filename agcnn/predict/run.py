"""One predict run, in phases: the checkpoint, the output folder, then the batch loop.

:func:`predict` checks everything that needs nothing written (options, checkpoint, device),
opens the output folder (lock, state, journal), lists the input, and feeds the files without a
row through the loader and the model one batch at a time; each batch's rows go to the journal
before the next batch starts. See :mod:`agcnn.predict` for the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agcnn import libmessages
from agcnn.data.geometry import Geometry
from agcnn.fileio import utc_now
from agcnn.predict.journal import (
    CSV_NAME,
    JOURNAL,
    STATE_FORMAT,
    Journal,
    check_state,
    check_writable,
    lock_output,
    write_manifest,
    write_tables,
)
from agcnn.predict.listing import Listing, list_files, shard_of
from agcnn.predict.options import PredictOptions
from agcnn.predict.outputs import COUNT_NOT_WRITTEN, COUNT_WRITTEN, Outputs, prepare_dicom_out
from agcnn.predict.records import FileRecords, collate, take_library_messages, worker_init
from agcnn.predict.rows import BatchProbabilities, build_rows, columns_for
from agcnn.runtime import cpu_count, loader_workers

OVERLAYS = "overlays"
STATUSES = ("ok", "skipped", "failed")
# Batches each decoding worker prepares ahead of the model.
PREFETCH = 2

log = logging.getLogger("agcnn.predict")


@dataclass
class Summary:
    out_dir: Path
    counts: Counter
    new_rows: int
    seconds: float  # of the decode + predict loop, without start-up
    # Values of the sources corrected or dropped in this run's DICOM results, by kind.
    dicom_fixes: Counter = field(default_factory=Counter)
    left: int = 0  # files not predicted yet: beyond the run's limit (PredictOptions.limit)

    @property
    def dicom_not_written(self) -> int:
        """DICOM images predicted with --dicom-out whose SR and SC could not be written (all rows)."""
        return self.counts.get(COUNT_NOT_WRITTEN, 0)

    def line(self) -> str:
        total = self.counts.get("ok", 0) + self.counts.get("skipped", 0) + self.counts.get("failed", 0)
        reasons = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(self.counts.items()) if ":" in k)
        rate = self.new_rows / self.seconds if self.seconds > 0 else 0.0
        written = self.counts.get(COUNT_WRITTEN, 0)
        dicom = (f"; {written} of {written + self.dicom_not_written} DICOM results written"
                 + (" (the notes column says why not)" if self.dicom_not_written else "")
                 if written + self.dicom_not_written else "")
        return (
            f"agcnn predict: {total} files: {self.counts.get('ok', 0)} ok, {self.counts.get('skipped', 0)} skipped, "
            f"{self.counts.get('failed', 0)} failed" + (f" ({reasons})" if reasons else "") + dicom
            + f"; {self.new_rows} processed in this run at {rate:.1f} files/s -> {self.out_dir / CSV_NAME}"
        )


def predict_folder(
    checkpoint: str | os.PathLike[str], input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], **options: Any
) -> Summary:
    """``predict(PredictOptions(checkpoint, input_dir, output_dir, **options))``."""
    return predict(PredictOptions(checkpoint, input_dir, output_dir, **options))


def predict(options: PredictOptions, *, loaded: LoadedModel | None = None) -> Summary:
    """Predict every file under ``options.input`` into ``options.output`` (see :mod:`agcnn.predict`).

    ``loaded``: the checkpoint's model, already loaded by :func:`load_model` on the device it
    runs on (a node that predicts every few seconds loads it once). Raises :class:`UsageError`
    (or :class:`~agcnn.errors.CheckpointError`) for problems found before any work (nothing is
    written then, except the output folder itself when it had to be created).
    """
    started, t0 = utc_now(), time.perf_counter()
    options.check()
    options = replace(options, workers=loader_workers(options.workers, "--workers"))
    if loaded is None:
        loaded = load_model(options.checkpoint, options.device)
    device = loaded.device

    out_dir = options.out_dir()
    check_writable(out_dir)
    columns = columns_for(loaded.labels, identifiers=options.include_identifiers, all_branches=options.all_branches,
                          calls=loaded.thresholds is not None, calibration=loaded.calibration is not None)
    lock = lock_output(out_dir)
    try:
        check_state(out_dir, {
            "format": STATE_FORMAT, "version": 1, "checkpoint_sha256": loaded.sha256, "labels": loaded.labels,
            "options": options.row_options(), "shard": list(options.shard) if options.shard else None,
            "columns": columns,
        })
        journal = Journal(out_dir / JOURNAL)
        try:
            # The DICOM libraries' messages can quote header values: counted, never shown.
            with libmessages.installed() as tally:
                return _run(options, loaded, device, out_dir, journal, columns, tally, started=started, t0=t0)
        finally:
            journal.close()
    finally:
        lock.close()


# ---------------------------------------------------------------------- the checkpoint

@dataclass
class LoadedModel:
    """A fusion-stage model ready to score (:func:`agcnn.inference.load_for_inference`), with
    its fusion operating points, one per label (None: the checkpoint has none)."""

    inference: Any  # agcnn.inference.InferenceModel
    thresholds: list[float | None] | None

    model = property(lambda self: self.inference.model)
    cfg = property(lambda self: self.inference.config)
    labels = property(lambda self: self.inference.labels)
    device = property(lambda self: self.inference.device)
    path = property(lambda self: str(self.inference.path))
    sha256 = property(lambda self: self.inference.sha256)
    # The checkpoint's calibration (agcnn calibrate), or None: the probabilities predict writes.
    calibration = property(lambda self: self.inference.calibration)


def load_model(checkpoint: str | os.PathLike[str], device: str = "cpu") -> LoadedModel:
    """Load and check a checkpoint for prediction on ``device`` (``--device``)."""
    from agcnn.inference import load_for_inference

    inference = load_for_inference(checkpoint, device, need="fusion", command="predict")
    return LoadedModel(inference=inference, thresholds=inference.operating_points("fusion"))


# ---------------------------------------------------------------------- the batch loop

def _run(options: PredictOptions, loaded: LoadedModel, device, out_dir: Path, journal: Journal, columns: list[str],
         tally: libmessages.Tally, *, started: str, t0: float) -> Summary:
    import torch
    from tqdm import tqdm

    in_dir, cfg = Path(options.input), loaded.cfg
    dicom_out = Path(options.dicom_out) if options.dicom_out is not None else None
    listing, mine, retried, pending, left = _work(options, journal, dicom_out)

    manifest = _manifest(options, loaded, device, columns, listing, mine, resumed=len(journal.done),
                         retried=len(retried), started=started)
    write_manifest(out_dir, manifest)

    threads_before = torch.get_num_threads()
    manifest["torch_threads"] = _share_cores(device, options.workers)

    pictures = options.overlays or dicom_out is not None
    infer = _Inference(loaded, device, maps=pictures, cams=pictures, method=options.explain, top=options.overlay_top)
    make_loader = _loader_factory(options, listing, cfg, pin_memory=device.type == "cuda")
    geometry = Geometry.from_config(cfg)
    thresholds = (torch.tensor([float("nan") if t is None else float(t) for t in loaded.thresholds])
                  if loaded.thresholds is not None else None)

    t_loop = time.perf_counter()
    bar = tqdm(total=len(pending), unit="file", desc="predict", disable=not options.progress or not pending,
               dynamic_ncols=True, file=sys.stderr)
    outputs = Outputs.of_model(loaded, geometry, overlays=out_dir / OVERLAYS if options.overlays else None,
                               dicom_out=dicom_out)
    writer = _BatchWriter(infer, journal, bar, columns=columns, labels=loaded.labels, geometry=geometry,
                          thresholds=thresholds, all_branches=options.all_branches, outputs=outputs,
                          calibration=loaded.calibration.id if loaded.calibration is not None else None)
    with torch.inference_mode(), _restore_threads(threads_before):
        run_batches(pending, make_loader, writer, done=journal.done, workers=options.workers,
                    batch_size=options.batch_size)
    bar.close()
    loop_seconds = time.perf_counter() - t_loop
    infer.close()
    new_rows = writer.rows

    total_counts = write_tables([journal.path], out_dir, columns)
    manifest.update(
        finished=utc_now(),
        seconds=round(time.perf_counter() - t0, 3),
        rows_this_run=new_rows,
        files_per_second=round(new_rows / loop_seconds, 3) if loop_seconds > 0 and new_rows else None,
        counts={k: v for k, v in sorted(total_counts.items()) if k in STATUSES},
        reasons={k: v for k, v in sorted(total_counts.items()) if ":" in k},
        complete=not left,
        **outputs.manifest_entries(total_counts, tally),
    )
    write_manifest(out_dir, manifest)
    if not mine:
        log.warning("no files found under %s", in_dir)
    return Summary(out_dir, total_counts, new_rows, loop_seconds, dicom_fixes=outputs.fixes, left=left)


def _work(options: PredictOptions, journal: Journal, dicom_out: Path | None):
    """(listing, this shard's files, the failed ones dropped for a retry, the files this run
    predicts, the files left for a later run by ``options.limit``)."""
    listing = list_files(Path(options.input), exclude=[Path(options.output), *([dicom_out] if dicom_out else [])])
    shard = options.shard
    mine = [p for p in listing.paths if shard is None or shard_of(p, shard[1]) == shard[0]]
    retried = journal.drop_failed(dicom=dicom_out is not None) if options.retry_failed else []
    pending = [p for p in mine if p not in journal.done]
    if dicom_out is not None:
        prepare_dicom_out(dicom_out, shard)
    limit = len(pending) if options.limit is None else options.limit
    return listing, mine, retried, pending[:limit], max(0, len(pending) - limit)


def _manifest(options: PredictOptions, loaded: LoadedModel, device, columns: list[str], listing: Listing, mine: list[str], *,
              resumed: int, retried: int, started: str) -> dict[str, Any]:
    """manifest.json at the start of a run: what is predicted, with what, on what (``complete``: False)."""
    import agcnn

    shard, dicom_out = options.shard, options.dicom_out
    return {
        "agcnn_version": agcnn.__version__,
        "checkpoint": {"path": loaded.path, "sha256": loaded.sha256},
        "arguments": {
            "checkpoint": str(options.checkpoint), "input": str(options.input), "output": str(options.output),
            "device": options.device, "batch_size": options.batch_size, "workers": options.workers,
            **options.row_options(), "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "retry_failed": options.retry_failed, "dicom_out": str(Path(dicom_out)) if dicom_out else None,
        },
        # What was predicted: frontal chest radiographs unless a check was switched off.
        "scope": {"any_body_part": options.any_body_part, "any_view": options.any_view},
        "labels": loaded.labels,
        "config": loaded.cfg.to_dict(),
        "operating_points": {"fusion": loaded.thresholds} if loaded.thresholds is not None else None,
        # Which map turned the model's outputs into the probabilities written (None: raw sigmoid).
        "calibration": loaded.calibration.describe() if loaded.calibration is not None else None,
        # Which pixels the model saw, and which ones the operating points were chosen on
        # (agcnn.data.datasets.XrayDataset.pixels): predict always decodes the originals.
        "pixels": {"source": "original"},
        "operating_points_pixels": ((loaded.inference.meta.get("operating_points_info") or {}).get("pixels")
                                    if loaded.thresholds is not None else None),
        "columns": columns,
        "versions": _library_versions(),
        "device": _device_name(device),
        "inference_precision": loaded.cfg.train.inference_precision,
        "listing": {"files": len(listing.paths), "sha256": listing.digest(), "duplicates_via_links": listing.duplicates,
                    "directory_loops": listing.loops},
        "share": {"k": shard[0], "n": shard[1], "files": len(mine)} if shard else None,
        "resumed_rows": resumed,
        "retried_failed_rows": retried,
        "started": started,
        "complete": False,
    }


class _Inference:
    """The model on its device: a batch of usable images -> probabilities (and maps).

    ``maps``: also the attention heatmap. ``cams``: also the fusion map of each finding an overlay
    explains; for CAM the scored pass keeps the two feature maps and the maps come from them
    without a second pass; Grad-CAM needs its own backward passes (:func:`agcnn.inference.explain_scores`).
    """

    def __init__(self, loaded: LoadedModel, device, *, maps: bool, cams: bool = False, method: str = "cam",
                 top: int | None = None):
        self.inference = loaded.inference
        self.device = device
        self.maps, self.cams, self.method, self.top = maps or cams, cams, method, top
        self.thresholds = loaded.thresholds

    def __call__(self, images) -> tuple[BatchProbabilities, dict[str, Any] | None]:
        import torch

        from agcnn import overlays
        from agcnn.inference import explain_scores

        # The checkpoint's precision and memory format on every device: its operating points
        # were chosen on validation scores computed the same way (agcnn.inference).
        scored = self.inference.score(images, stage="fusion", features=self.cams and self.method == "cam")
        # Sigmoid, then the checkpoint's calibration (if any), as evaluate applies it: rows, calls,
        # overlays and the SR all read these probabilities.
        probs = BatchProbabilities(
            fusion=self.inference.probabilities(scored, "fusion"),
            global_=self.inference.probabilities(scored, "global"),
            local=self.inference.probabilities(scored, "local"),
            boxes=scored.boxes.cpu(),
        )
        if not self.maps:
            return probs, None
        if not self.cams:
            return probs, {"heatmap": scored.heatmap.cpu()}
        chosen, left_out = overlays.choose_findings(probs.fusion.numpy(), self.thresholds, self.top)
        k = max(1, max(len(c) for c in chosen))
        # Pad every image's list to k (an image with none still needs a row); only chosen maps are drawn.
        classes = torch.tensor([(c + [c[0] if c else 0] * k)[:k] for c in chosen], device=self.device)
        ex = explain_scores(self.inference.model, scored, classes, method=self.method, branches=("fusion",))
        return probs, {"heatmap": scored.heatmap.cpu(), "fusion": ex.maps["fusion"].float().cpu(),
                       "chosen": chosen, "left_out": left_out, "method": self.method}

    def close(self) -> None:
        pass


class _BatchWriter:
    """Each decoded batch -> the model -> rows (and pictures, DICOM results) -> one journal append."""

    def __init__(self, infer: _Inference, journal: Journal, bar, *, columns: list[str], labels: list[str],
                 geometry: Geometry, thresholds, all_branches: bool, outputs: Outputs, calibration: str | None = None):
        self.infer, self.journal, self.bar, self.calibration = infer, journal, bar, calibration
        self.columns, self.labels, self.geometry = columns, labels, geometry
        self.thresholds, self.all_branches, self.outputs = thresholds, all_branches, outputs
        self.counts: Counter = Counter()
        self.rows = 0

    def __call__(self, records: list[dict[str, Any]], images) -> None:
        take_library_messages(records)
        probs, maps = self.infer(images) if images is not None else (None, None)
        rows = build_rows(records, probs, columns=self.columns, labels=self.labels, geometry=self.geometry,
                          thresholds=self.thresholds, all_branches=self.all_branches, calibration=self.calibration)
        if probs is not None:
            # Before the rows: a kill in between re-predicts these files, which rewrites their
            # pictures and objects under the same names -- never a second set.
            self.outputs.write(records, rows, probs, maps)
        self.journal.append(rows)
        self.counts.update(rec["status"] for rec in records)
        self.rows += len(rows)
        self.bar.update(len(rows))
        self.bar.set_postfix(ok=self.counts["ok"], skipped=self.counts["skipped"], failed=self.counts["failed"],
                             refresh=False)


# ---------------------------------------------------------------------- decoding, and decoder crashes

def _loader_factory(options: PredictOptions, listing: Listing, cfg, *, pin_memory: bool) -> Callable:
    """``make_loader(paths, workers, batch_size)``: a DataLoader of records over ``paths``."""
    import functools

    from torch.utils.data import DataLoader

    from agcnn.data.transforms import transforms_from_config

    transform = transforms_from_config(cfg.data, train=False)
    dicom = options.dicom_out is not None
    # Workers die with this process (see records.worker_init), not seconds after it.
    init = functools.partial(worker_init, parent=os.getpid())

    def make_loader(paths: Sequence[str], n_workers: int, batch: int) -> DataLoader:
        dataset = FileRecords(str(Path(options.input)), paths, listing.decided, transform,
                              identifiers=options.include_identifiers, previews=options.overlays or dicom,
                              scope=options.scope(), headers=dicom)
        return DataLoader(
            dataset, batch_size=batch, shuffle=False, num_workers=n_workers, collate_fn=collate,
            pin_memory=pin_memory, worker_init_fn=init if n_workers else None,
            prefetch_factor=PREFETCH if n_workers else None, persistent_workers=False,
        )

    return make_loader


def run_batches(pending: Sequence[str], make_loader: Callable, handle: Callable, *, done: Container[str],
                workers: int, batch_size: int) -> None:
    """``handle(records, images)`` for each decoded batch over ``pending``, each file once.

    A decoder that crashes its process (a segfault in a codec on a malformed file) kills a
    worker; the loader then fails -- in whatever the main process is doing, ``handle``
    included -- without saying which file did it. The files still to do (``done`` holds those
    already handled) are then decoded one file per process for as many as were in flight, so
    the culprit gets a "failed" record and every other file its image, and the loader restarts
    after them.
    """
    todo = list(pending)
    while todo:
        try:
            for records, images in make_loader(todo, workers, batch_size):
                handle(records, images)
            return
        except RuntimeError as e:
            if not workers or not _is_worker_death(e):
                raise
        todo = [p for p in todo if p not in done]
        in_flight = batch_size * (workers * PREFETCH + 1)
        window, todo = todo[:in_flight], todo[in_flight:]
        isolated = [_decode_isolated(make_loader, path) for path in window]
        for i in range(0, len(isolated), batch_size):
            handle(*collate(isolated[i : i + batch_size]))


def _is_worker_death(e: BaseException) -> bool:
    msg = str(e)
    return "DataLoader worker" in msg and ("exited unexpectedly" in msg or "killed by signal" in msg)


def _decode_isolated(make_loader: Callable, path: str) -> dict[str, Any]:
    """Decode one file in a worker process of its own; a crash there names the file."""
    try:
        records, images = next(iter(make_loader([path], 1, 1)))
    except RuntimeError as e:
        if not _is_worker_death(e):
            raise
        return {"path": path, "status": "failed",
                "reason": "decode_error: the decoder crashed on this file (its process died); the file is probably corrupt"}
    rec = records[0]
    if images is not None:
        rec["image"] = images[0]  # back into the record, for the collate of the model batch
    return rec


# ---------------------------------------------------------------------- the machine, for the manifest

def _share_cores(device, workers: int) -> int:
    """The model's CPU threads beside ``workers`` decoding processes; returns their number."""
    import torch

    if device.type != "cuda" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to each decoding worker: oversubscribed OpenMP threads spin at their
        # barriers and slow the model several-fold (measured: 5x with 2 threads + 2 workers on
        # 2 busy cores). OMP_NUM_THREADS, when set, is the user's choice and is kept.
        torch.set_num_threads(max(1, cpu_count() - workers))
    return torch.get_num_threads()


@contextlib.contextmanager
def _restore_threads(n: int):
    import torch

    try:
        yield
    finally:
        torch.set_num_threads(n)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_count()} cores)"


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "torchvision", "numpy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                 "python-gdcm", "pillow", "opencv-python-headless", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
