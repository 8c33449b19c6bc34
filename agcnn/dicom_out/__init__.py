"""Results as DICOM objects a PACS can file with the study (``agcnn predict --dicom-out DIR``).

For each predicted DICOM instance, two objects written with highdicom:

* ``<relpath>.sr.dcm`` -- a Comprehensive SR (TID 1500 Measurement Report) holding

  - an image-level measurement group: per finding, the fusion probability (UCUM ``1``) and,
    when the checkpoint has operating points, the call (Present / Absent, SCT 52101004 /
    272519000) at that point;
  - a planar ROI group: the attended region (paper Sec. 3.2) as a closed POLYLINE spatial
    coordinate on the source image, in its pixel coordinates;
  - the algorithm's name and version, the checkpoint's sha256 and the operating points
    (Algorithm Identification, TID 4019), and the source SOP Instance as evidence and as the
    region's source image.

* ``<relpath>.sc.dcm`` -- a Secondary Capture (RGB) of the image with a map (predict draws the
  fusion CAM of the first finding its overlays explain, see :mod:`agcnn.explain`) and the box
  drawn over it, marked DERIVED \\ SECONDARY, Burned In Annotation YES, and "not for diagnosis" in
  Image Comments, the Series Description and the picture itself; it references the source
  image in Source Image Sequence.

Findings are coded in the local coding scheme ``99AGCNN`` (PS3.16 8.2: private schemes start
with 99): the ChestX-ray14 labels were mined from report text and are not the SNOMED concepts
of the same name. Code value = the label, meaning = the label in words.

Both objects copy the source's Patient and Study attributes, which is what lets the archive
file them with the study -- and is why they go to a folder of their own: they hold identifiers,
the CSV / JSONL do not. What is copied is first made valid for its VR
(:mod:`agcnn.dicom_out.source`: "62" becomes "062Y", a hash in a birth date is dropped, a Type 2
attribute the source lacks is written empty), so the objects pass a validator (``dciodvfy``)
whatever the de-identifier left; each correction is counted by kind, never with its value.
Every object gets a new SOP Instance UID; the series UID is derived from (study, checkpoint,
object kind), so one model's results on one study share a series across runs. Each file is written to a temporary
name and renamed, so a kill never leaves half an object; writing the same instance again
replaces both files.

The package: this module (what goes in, :class:`DicomResult`; the file names; the one entry
point :func:`write_dicom_results`), :mod:`~agcnn.dicom_out.source` (the source header made fit
to copy), :mod:`~agcnn.dicom_out.sr` and :mod:`~agcnn.dicom_out.sc` (the two builders).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CODING_SCHEME",
    "NOT_FOR_DIAGNOSIS",
    "SR_SUFFIX",
    "SC_SUFFIX",
    "DicomResult",
    "DicomWriteError",
    "SourceError",
    "object_paths",
    "is_temporary",
    "series_uid",
    "finding_code",
    "call_code",
    "write_dicom_results",
    "render_overlay",
]

CODING_SCHEME = "99AGCNN"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: research output of agcnn"
SR_SUFFIX = ".sr.dcm"
SC_SUFFIX = ".sc.dcm"
MANUFACTURER = "agcnn"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


class DicomWriteError(Exception):
    """The results of one image could not be written. The message names the step (and the
    attribute, where one is known), never a header value: it goes to the row and the log."""

    def __init__(self, message: str, step: str, attribute: str | None = None):
        super().__init__(message)
        self.step, self.attribute = step, attribute


class SourceError(DicomWriteError, ValueError):
    """The source header lacks what the results must reference; the message names the attribute."""

    def __init__(self, message: str, attribute: str | None = None):
        super().__init__(message, "reading the source header", attribute)


@dataclass
class DicomResult:
    """What goes into one image's results: its prediction, as written to predictions.csv.

    The SR carries every field (:func:`agcnn.dicom_out.sr.build_sr`); a new one (a calibration
    id, say) is a field here and a line in :func:`agcnn.dicom_out.sr.algorithm_parameters`.
    """

    labels: Sequence[str]
    probabilities: Sequence[float | None]
    thresholds: Sequence[float | None] | None  # the checkpoint's fusion operating points
    box: tuple[int, int, int, int]  # attended region in source pixels, x1 / y1 exclusive
    algorithm_version: str
    checkpoint_sha256: str
    algorithm_name: str = "agcnn AG-CNN"
    # Which calibration turned the model's outputs into these probabilities (None: raw sigmoid).
    calibration: str | None = None


def object_paths(out_dir: str | os.PathLike[str], rel: str) -> tuple[Path, Path]:
    """(SR path, Secondary Capture path) for the input file at relative path ``rel``."""
    base = Path(out_dir) / rel
    return base.with_name(base.name + SR_SUFFIX), base.with_name(base.name + SC_SUFFIX)


def finding_code(label: str):
    """The coded concept of one finding's probability (scheme 99AGCNN, value = label)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=label, scheme_designator=CODING_SCHEME, meaning=f"{label.replace('_', ' ')} probability")


def call_code(label: str):
    """The coded concept of one finding's call at the operating point."""
    from highdicom.sr import CodedConcept

    return CodedConcept(
        value=f"{label}-call", scheme_designator=CODING_SCHEME,
        meaning=f"{label.replace('_', ' ')} at operating point",
    )


def is_temporary(name: str) -> str | None:
    """The source's file name, when ``name`` is a temporary object file a killed run left."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    for suffix in (SR_SUFFIX, SC_SUFFIX):
        # fileio.atomic_write_bytes names them ".<name>.<random>.tmp" (earlier: ".<name>.tmp").
        at = name.rfind(suffix + ".")
        if at > 1:
            return name[1:at]
    return None


def series_uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same parts give the same UID, in every run."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def render_overlay(
    preview: np.ndarray,
    *,
    height: int,
    width: int,
    box: tuple[int, int, int, int],
    field: tuple[int, int, int, int],
    heat: np.ndarray,
    caption: str = "",
) -> np.ndarray:
    """RGB uint8 picture at the preview's size: the image, ``heat`` over ``field``, the box.

    ``preview`` is the original image as uint8 (any size, same aspect), ``box`` and ``field``
    boxes in original pixels (exclusive ends), ``heat`` a map over ``field``, scaled to [0, 1]
    here. A "not for diagnosis" line is burned in at the bottom, ``caption`` (e.g. the finding
    whose map is drawn) at the top; nothing from the file's header is drawn.
    """
    import cv2

    preview = np.asarray(preview, dtype=np.uint8)
    ph, pw = preview.shape
    sy, sx = ph / height, pw / width
    rgb = np.repeat(preview[..., None], 3, axis=2).astype(np.float32)
    heat = np.asarray(heat, dtype=np.float32)
    span = float(heat.max() - heat.min()) if heat.size else 0.0
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    fx0, fy0, fx1, fy1 = (int(round(v * s)) for v, s in zip(field, (sx, sy, sx, sy)))
    fx0, fy0 = max(fx0, 0), max(fy0, 0)
    fx1, fy1 = min(max(fx1, fx0 + 1), pw), min(max(fy1, fy0 + 1), ph)
    if fx1 > fx0 and fy1 > fy0:
        grid = cv2.resize(heat, (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap(np.clip(grid * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        region = rgb[fy0:fy1, fx0:fx1]
        rgb[fy0:fy1, fx0:fx1] = 0.65 * region + 0.35 * colour.astype(np.float32)
    out = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8))
    bx0, by0, bx1, by1 = box
    p0 = (int(bx0 * sx), int(by0 * sy))
    p1 = (max(int(np.ceil(bx1 * sx)) - 1, p0[0]), max(int(np.ceil(by1 * sy)) - 1, p0[1]))
    cv2.rectangle(out, p0, p1, (0, 255, 0), max(1, round(min(ph, pw) / 256)))
    scale = max(0.3, min(ph, pw) / 1000)
    cv2.putText(out, "NOT FOR DIAGNOSTIC USE", (4, ph - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1,
                cv2.LINE_AA)
    if caption:
        cv2.putText(out, caption, (4, int(14 * scale / 0.4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1,
                    cv2.LINE_AA)
    return out


def write_dicom_results(
    out_dir: str | os.PathLike[str],
    rel: str,
    source: Any,
    result: DicomResult,
    *,
    picture: np.ndarray,
    map_name: str,
    fixes: Counter | None = None,
) -> tuple[Path, Path]:
    """Write the SR and the Secondary Capture for one source instance; returns their paths.

    ``source`` is the source's pydicom Dataset (pixels not needed) or its path; ``picture``
    the RGB uint8 rendering (see :func:`render_overlay`); ``map_name`` names the map drawn
    in it (e.g. "attention heatmap"). ``fixes`` (if given) counts the corrections made to the
    copied attributes, by kind. Raises :class:`DicomWriteError` naming the step that failed
    (and the attribute, where one is known); nothing is left half-written.
    """
    from agcnn.dicom_out.sc import build_sc
    from agcnn.dicom_out.source import clean_source
    from agcnn.dicom_out.sr import build_sr

    with _step("reading the source header"):
        if isinstance(source, (str, os.PathLike)):
            from pydicom import dcmread

            source = dcmread(source, stop_before_pixels=True, force=True)
        clean = clean_source(source, fixes)
    with _step("building the Secondary Capture"):
        sc = build_sc(clean, result, picture=picture, map_name=map_name)
    with _step("building the SR"):
        sr = build_sr(clean, result)
    sr_path, sc_path = object_paths(out_dir, rel)
    with _step("writing the Secondary Capture"):
        _save(sc, sc_path)
    with _step("writing the SR"):
        _save(sr, sr_path)
    return sr_path, sc_path


@contextlib.contextmanager
def _step(step: str):
    """Turn any failure inside into a :class:`DicomWriteError` that names ``step``.

    Library messages can quote header values, so only the error's kind, where it was raised
    and the DICOM keywords it names are kept; the original stays chained (``--debug``).
    """
    try:
        yield
    except DicomWriteError:
        raise
    except OSError as e:
        raise DicomWriteError(f"{step} failed ({e.strerror or type(e).__name__})", step) from e
    except Exception as e:  # noqa: BLE001 - any library error becomes a reason for the row
        keywords = _keywords_in(str(e))
        where = _raised_in(e)
        about = f", about {', '.join(keywords)}" if keywords else ""
        raise DicomWriteError(f"{step} failed ({type(e).__name__} in {where}{about})", step,
                              keywords[0] if keywords else None) from e


def _keywords_in(message: str) -> list[str]:
    """The DICOM keywords a library message names (never the values it quotes)."""
    import re

    from pydicom.datadict import tag_for_keyword

    found = []
    for word in re.findall(r"\b[A-Z][A-Za-z]{3,}\b", message):
        if tag_for_keyword(word) is not None and word not in found:
            found.append(word)
    return found[:3]


def _raised_in(e: BaseException) -> str:
    """``module.function`` of the innermost frame, e.g. ``highdicom.base.__init__``."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    parts = Path(last.filename).with_suffix("").parts
    for anchor in ("site-packages", "dist-packages", "agcnn"):
        if anchor in parts:
            i = parts.index(anchor)
            parts = parts[i + 1 :] if anchor != "agcnn" else parts[i:]
            break
    else:
        parts = parts[-2:]
    return ".".join(parts) + f".{last.name}"


def _save(ds, path: Path) -> None:
    from agcnn.fileio import atomic_write_bytes

    atomic_write_bytes(path, lambda f: ds.save_as(f, enforce_file_format=True))
