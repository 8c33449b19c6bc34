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

Both objects copy the source's Patient and Study modules (highdicom does this from the source
dataset), which is what lets the archive file them with the study -- and is why they go to a
folder of their own: they hold identifiers, the CSV / JSONL do not. Every object gets a new
SOP Instance UID; the series UID is derived from (study, checkpoint, object kind), so one
model's results on one study share a series across runs. Each file is written to a temporary
name and renamed, so a kill never leaves half an object; writing the same instance again
replaces both files.
"""

from __future__ import annotations

import os
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
    "SourceError",
    "object_paths",
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


class SourceError(ValueError):
    """The source header lacks what the results must reference; the message holds no values."""


@dataclass
class DicomResult:
    """One image's prediction, as it is written to predictions.csv."""

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


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def _atomic_save(ds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
) -> tuple[Path, Path]:
    """Write the SR and the Secondary Capture for one source instance; returns their paths.

    ``source`` is the source's pydicom Dataset (pixels not needed) or its path; ``picture``
    the RGB uint8 rendering (see :func:`render_overlay`); ``map_name`` names the map drawn
    in it (e.g. "attention heatmap").
    """
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.codedict import codes

    from pydicom.dataset import Dataset

    if not isinstance(source, Dataset):
        source = dcmread(source, stop_before_pixels=True, force=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise SourceError(f"the source has no {keyword}, which the results must reference")
    sr_path, sc_path = object_paths(out_dir, rel)
    study = str(source.StudyInstanceUID)

    # ---- Secondary Capture: the picture
    # The picture keeps the source's orientation. highdicom wants one for a patient-based
    # image; when the source states none, the (type 2) attribute is left empty after all.
    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or []))
    orientation = orientation if len(orientation) == 2 and all(orientation) else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=orientation or ("L", "F"),
        series_instance_uid=_uid(study, result.checkpoint_sha256, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation is None:
        sc.PatientOrientation = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "agcnn attention (research, not for diagnosis)"
    sc.ImageComments = (
        f"{NOT_FOR_DIAGNOSIS}. {map_name} over the model's field of view; green box: attended region "
        f"{tuple(result.box)} in source pixels."
    )
    sc.DerivationDescription = f"{map_name} and attended region of {result.algorithm_name} {result.algorithm_version}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.SoftwareVersions = result.algorithm_version

    # ---- Comprehensive SR: the numbers
    params = [f"checkpoint sha256 {result.checkpoint_sha256}",
              f"probabilities: {result.calibration or 'raw model output, no calibration'}"]
    if result.thresholds is not None:
        params.append("operating points " + ", ".join(
            f"{lab} {'none' if t is None else format(float(t), 'g')}" for lab, t in zip(result.labels, result.thresholds)
        ))
    algorithm = hd.sr.AlgorithmIdentification(name=result.algorithm_name, version=result.algorithm_version,
                                              parameters=params)
    measurements = []
    evaluations = []
    for j, label in enumerate(result.labels):
        p = result.probabilities[j]
        if p is None:
            continue
        measurements.append(hd.sr.Measurement(name=finding_code(label), value=float(p), unit=codes.UCUM.NoUnits,
                                              algorithm_id=algorithm))
        t = None if result.thresholds is None else result.thresholds[j]
        if t is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=call_code(label), value=codes.SCT.Present if float(p) >= float(t) else codes.SCT.Absent))
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="findings"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    x0, y0, x1, y1 = (float(v) for v in result.box)
    # SCOORD pixel coordinates: (column, row) with (0, 0) the top-left corner of the top-left
    # pixel (PS3.3 C.18.6.1.1), so the exclusive box ends are the region's outer edges.
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    roi_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="attended region"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        ),
        finding_type=codes.DCM.ImageRegion,
        algorithm_id=algorithm,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("agcnn", result.checkpoint_sha256), name=result.algorithm_name,
            manufacturer_name=MANUFACTURER, model_name=result.checkpoint_sha256[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ChestImaging,
        imaging_measurements=[image_group, roi_group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=_uid(study, result.checkpoint_sha256, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "agcnn findings (research, not for diagnosis)"
    sr.SoftwareVersions = result.algorithm_version

    _atomic_save(sc, sc_path)
    _atomic_save(sr, sr_path)
    return sr_path, sc_path
