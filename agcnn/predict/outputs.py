"""What predict writes beside the rows: overlay pictures and DICOM results, with their content choices.

For each ``ok`` record of a batch, after the model and before the rows go to the journal:

* ``--overlays``: ``OUT/overlays/<path>.png`` (:mod:`agcnn.overlays`) -- the attention heatmap and
  box, and the fusion map of each finding :func:`agcnn.overlays.choose_findings` picked;
* ``--dicom-out DIR``: for a DICOM record, the SR and the Secondary Capture
  (:func:`agcnn.dicom_out.write_dicom_results`). The picture shows the fusion map of the first
  finding the overlays would explain (the most probable one called positive, or
  ``--overlay-top``), or the attention heatmap when there is none.

Nothing is lost in silence. A picture or result that cannot be written becomes a note in its row
naming the step (and the attribute) that failed; a DICOM record's row also carries
``dicom_results`` (``written`` / ``not written: ...``; JSON Lines only), which the summary counts
("14 of 16 DICOM results written"), which makes the run exit 1, and which ``--retry-failed``
retries. Each file's library messages are counted against its path (:mod:`agcnn.libmessages`),
never shown: they can quote header values.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agcnn import libmessages
from agcnn.data.geometry import Geometry
from agcnn.predict.rows import BOX_COLUMNS, BatchProbabilities

__all__ = [
    "DICOM_KEY", "WRITTEN", "NOT_WRITTEN", "COUNT_WRITTEN", "COUNT_NOT_WRITTEN",
    "Outputs", "prepare_dicom_out", "dicom_not_written",
]

log = logging.getLogger("agcnn.predict")

# The row key (JSON Lines) that says what became of a DICOM record's results.
DICOM_KEY = "dicom_results"
WRITTEN = "written"
NOT_WRITTEN = "not written"
# Their keys in the counts journal.write_tables returns (beside the statuses and reasons).
COUNT_WRITTEN = "dicom written"
COUNT_NOT_WRITTEN = "dicom not_written"


def dicom_not_written(row: dict[str, Any]) -> bool:
    """Whether a journal row is of a DICOM image whose results could not be written."""
    return str(row.get(DICOM_KEY) or "").startswith(NOT_WRITTEN)


@dataclass
class Outputs:
    """The pictures and DICOM results of one run, and what became of them."""

    labels: Sequence[str]
    geometry: Geometry
    overlays: Path | None = None
    dicom_out: Path | None = None
    thresholds: Sequence[float | None] | None = None  # the checkpoint's fusion operating points
    checkpoint_sha256: str = ""
    calibration: str | None = None  # what turned the model's outputs into the probabilities (None: raw)
    dicom: Counter = field(default_factory=Counter)  # WRITTEN / NOT_WRITTEN, this run
    fixes: Counter = field(default_factory=Counter)  # corrections of copied attributes, by kind

    @classmethod
    def of_model(cls, loaded: Any, geometry: Geometry, *, overlays: Path | None, dicom_out: Path | None) -> Outputs:
        """The outputs of a run with ``loaded`` (:class:`agcnn.predict.run.LoadedModel`)."""
        calibration = loaded.calibration.summary() if loaded.calibration is not None else None
        return cls(labels=loaded.labels, geometry=geometry, overlays=overlays, dicom_out=dicom_out,
                   thresholds=loaded.thresholds, checkpoint_sha256=loaded.sha256, calibration=calibration)

    def write(self, records: Sequence[dict[str, Any]], rows: list[dict[str, Any]], probs: BatchProbabilities,
              maps: dict[str, Any]) -> None:
        """The outputs of each ``ok`` record of a batch; failures become notes in their rows."""
        k = 0
        for rec, row in zip(records, rows):
            if rec["status"] != "ok":
                continue
            with libmessages.for_file(rec["path"]):
                if self.overlays is not None:
                    self._overlay(rec, row, probs.fusion[k], maps, k)
                if self.dicom_out is not None and rec.get("format") == "dicom":
                    self._dicom(rec, row, maps, k)
            k += 1

    def field_of_view(self, rec: dict[str, Any]) -> tuple[int, int, int, int]:
        """The model's field of view (the centre crop) in the original image's pixels."""
        return self.geometry.field(height=rec["height"], width=rec["width"])

    def _overlay(self, rec, row, p, maps, k: int) -> None:
        from agcnn import overlays

        findings = [overlays.FindingMap(self.labels[j], float(p[j]), maps["fusion"][k, i].numpy())
                    for i, j in enumerate(maps["chosen"][k])]
        try:
            overlays.write_overlay(
                self.overlays / (rec["path"] + ".png"), preview=rec["preview"].numpy(),
                height=rec["height"], width=rec["width"], box=tuple(row[c] for c in BOX_COLUMNS),
                field=self.field_of_view(rec), heatmap=maps["heatmap"][k].numpy(), findings=findings,
                left_out=maps["left_out"][k], map_name=_method_name(maps, "fusion "),
            )
        except OSError as e:
            # A picture that cannot be written (name too long, disk full) must not cost the
            # prediction, or stop the run at the same file on every re-run.
            _note(row, f"overlay not written: {e.strerror or e}")

    def _dicom(self, rec, row, maps, k: int) -> None:
        import agcnn
        from agcnn.dicom_out import DicomResult, DicomWriteError, SourceError, render_overlay, write_dicom_results

        fixes: Counter = Counter()
        try:
            header = rec.get("dicom_header")
            if header is None:
                raise SourceError("the header could not be read")
            box = tuple(int(row[c]) for c in BOX_COLUMNS)
            heat, map_name, caption = self.picture_choice(row, maps, k)
            picture = render_overlay(rec["preview"].numpy(), height=rec["height"], width=rec["width"], box=box,
                                     field=self.field_of_view(rec), heat=heat, caption=caption)
            result = DicomResult(labels=self.labels, probabilities=[row[lab] for lab in self.labels],
                                 thresholds=self.thresholds, box=box, algorithm_version=agcnn.__version__,
                                 checkpoint_sha256=self.checkpoint_sha256, calibration=self.calibration)
            write_dicom_results(self.dicom_out, rec["path"], header, result, picture=picture, map_name=map_name,
                                fixes=fixes)
        except DicomWriteError as e:
            self._not_written(row, rec["path"], str(e), e)
            return
        except Exception as e:  # noqa: BLE001 - the picture on an odd array; the prediction stands
            self._not_written(row, rec["path"], f"drawing the picture failed ({type(e).__name__})", e)
            return
        self.dicom[WRITTEN] += 1
        self.fixes.update(fixes)
        row[DICOM_KEY] = WRITTEN + (f"; source attributes corrected or dropped: {'; '.join(sorted(fixes))}"
                                    if fixes else "")

    def _not_written(self, row, rel: str, reason: str, error: BaseException) -> None:
        self.dicom[NOT_WRITTEN] += 1
        row[DICOM_KEY] = f"{NOT_WRITTEN}: {reason}"
        _note(row, f"DICOM results not written: {reason}")
        if libmessages.debug_enabled():
            # The traceback can quote header values: only with --debug, which the user asked for.
            log.error("DICOM results of %s not written: %s", rel, reason, exc_info=error)

    def picture_choice(self, row: dict[str, Any], maps: dict[str, Any], k: int):
        """(map, its name for the Image Comments, the caption burned in) for the Secondary Capture.

        The fusion map of the first finding the overlays would explain (the most probable one
        called positive, or ``--overlay-top``); with none, the attention heatmap.
        """
        method = _method_name(maps)
        chosen = maps["chosen"][k]
        if not chosen:
            return (maps["heatmap"][k].numpy(), "attention heatmap (paper Eq. 3); no finding called positive",
                    "no finding called positive (attention map)")
        label = self.labels[chosen[0]]
        p = row[label]
        return (maps["fusion"][k, 0].numpy(), f"fusion {method} of {label} (probability {p:.2f})",
                f"{label} {p:.2f} ({method})")

    def manifest_entries(self, total_counts: Counter, tally: libmessages.Tally) -> dict[str, Any]:
        """For the manifest: the DICOM results of all rows and of this run (with the corrections
        of copied attributes by kind), and the library messages by kind and file (never their text)."""
        out: dict[str, Any] = {"library_messages": tally.as_dict()}
        if self.dicom_out is not None:
            out["dicom_results"] = {
                "written": total_counts.get(COUNT_WRITTEN, 0), "not_written": total_counts.get(COUNT_NOT_WRITTEN, 0),
                "this_run": {"written": self.dicom[WRITTEN], "not_written": self.dicom[NOT_WRITTEN],
                             "source_attributes_corrected": dict(sorted(self.fixes.items()))},
            }
        return out


def _method_name(maps: dict[str, Any], prefix: str = "") -> str:
    return prefix + ("CAM" if maps.get("method") == "cam" else "Grad-CAM")


def _note(row: dict[str, Any], text: str) -> None:
    row["notes"] = "; ".join(filter(None, [row.get("notes"), text]))


def prepare_dicom_out(folder: Path, shard: tuple[int, int] | None) -> None:
    """Create the DICOM results folder; remove temporary files a killed run left in it.

    Only this share's: the other shares of a ``--shard`` run write to the same folder, and may
    be writing right now.
    """
    from agcnn.dicom_out import is_temporary
    from agcnn.predict.listing import shard_of
    from agcnn.errors import UsageError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--dicom-out {str(folder)!r} cannot be created ({e.strerror}); pass a folder this user can write to") from None
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            source = is_temporary(name)
            if source is None:
                continue
            rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            if shard is None or shard_of(source if rel_dir == "." else f"{rel_dir}/{source}", shard[1]) == shard[0]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
