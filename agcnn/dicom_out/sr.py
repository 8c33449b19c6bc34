"""The Comprehensive SR (TID 1500 Measurement Report): the numbers of one prediction.

Two measurement groups: the image-level findings (per finding the fusion probability, UCUM
``1``, and the call at the checkpoint's operating point, SCT Present / Absent), and the attended
region as a closed POLYLINE on the source image. Both name the algorithm (TID 4019) with its
parameters (:func:`algorithm_parameters`); the observer is the device, the evidence the source
instance. What goes in is a :class:`agcnn.dicom_out.DicomResult`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agcnn.dicom_out import (
    CODING_SCHEME,
    MANUFACTURER,
    SR_SERIES_NUMBER,
    DicomResult,
    call_code,
    finding_code,
    series_uid,
)

__all__ = ["SR_DESCRIPTION", "algorithm_parameters", "build_sr"]

SR_DESCRIPTION = "agcnn findings (research, not for diagnosis)"


def algorithm_parameters(result: DicomResult) -> list[str]:
    """The Algorithm Parameters lines of the SR: what else a reader needs to redo the numbers."""
    params = [f"checkpoint sha256 {result.checkpoint_sha256}",
              f"probabilities: {result.calibration or 'raw model output, no calibration'}"]
    if result.thresholds is not None:
        params.append("operating points " + ", ".join(
            f"{lab} {'none' if t is None else format(float(t), 'g')}" for lab, t in zip(result.labels, result.thresholds)
        ))
    return params


def build_sr(source: Any, result: DicomResult):
    """The SR for ``source`` (a header cleaned by :func:`agcnn.dicom_out.source.clean_source`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(name=result.algorithm_name, version=result.algorithm_version,
                                              parameters=algorithm_parameters(result))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=series_uid("agcnn", result.checkpoint_sha256), name=result.algorithm_name,
            manufacturer_name=MANUFACTURER, model_name=result.checkpoint_sha256[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ChestImaging,
        imaging_measurements=[_findings_group(source, result, algorithm), _region_group(source, result, algorithm)],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_uid(str(source.StudyInstanceUID), result.checkpoint_sha256, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        # The private scheme the findings are coded in, declared (PS3.3 C.12.1.1.2).
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name="agcnn ChestX-ray14 findings", responsible_organization=MANUFACTURER)],
    )
    sr.SeriesDescription = SR_DESCRIPTION
    sr.SoftwareVersions = result.algorithm_version
    return sr


def _findings_group(source: Any, result: DicomResult, algorithm):
    """Per finding with a probability: the probability, and its call where it has an operating point."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements, evaluations = [], []
    for j, label in enumerate(result.labels):
        p = result.probabilities[j]
        if p is None:  # NaN in the row: no number to report
            continue
        measurements.append(hd.sr.Measurement(name=finding_code(label), value=float(p), unit=codes.UCUM.NoUnits,
                                              algorithm_id=algorithm))
        t = None if result.thresholds is None else result.thresholds[j]
        if t is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=call_code(label), value=codes.SCT.Present if float(p) >= float(t) else codes.SCT.Absent))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="findings"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _region_group(source: Any, result: DicomResult, algorithm):
    """The attended region (paper Sec. 3.2) as a closed polyline on the source image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    x0, y0, x1, y1 = (float(v) for v in result.box)
    # SCOORD pixel coordinates: (column, row) with (0, 0) the top-left corner of the top-left
    # pixel (PS3.3 C.18.6.1.1), so the exclusive box ends are the region's outer edges.
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="attended region"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        ),
        finding_type=codes.DCM.ImageRegion,
        algorithm_id=algorithm,
    )
