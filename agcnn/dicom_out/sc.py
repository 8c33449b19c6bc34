"""The Secondary Capture: the picture of one prediction (the image, a map, the attended box).

RGB, marked DERIVED \\ SECONDARY, Burned In Annotation YES, "not for diagnosis" in Image
Comments, the Series Description and the picture itself (:func:`agcnn.dicom_out.render_overlay`);
it references the source image in Source Image Sequence and keeps its body part and side, so
the General Series' Laterality (Type 2C) is right: absent for the chest, the side where the
source gives one, empty (unknown) otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agcnn.dicom_out import MANUFACTURER, NOT_FOR_DIAGNOSIS, SC_SERIES_NUMBER, DicomResult, series_uid
from agcnn.dicom_out.source import laterality

__all__ = ["SC_DESCRIPTION", "build_sc"]

SC_DESCRIPTION = "agcnn attention (research, not for diagnosis)"


def build_sc(source: Any, result: DicomResult, *, picture: np.ndarray, map_name: str):
    """The Secondary Capture for ``source`` (a header cleaned by :func:`~agcnn.dicom_out.source.clean_source`).

    ``picture``: the RGB uint8 rendering; ``map_name`` names the map drawn in it.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    # The picture keeps the source's orientation. highdicom wants one for a patient-based
    # image; when the source states none, the (Type 2C) attribute is left empty after all.
    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or []))
    orientation = orientation if len(orientation) == 2 and all(orientation) else None
    side = laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=orientation or ("L", "F"),
        laterality=side or None,
        series_instance_uid=series_uid(str(source.StudyInstanceUID), result.checkpoint_sha256, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation is None:
        sc.PatientOrientation = ""
    if side == "":
        sc.Laterality = ""  # Type 2C, unknown: a paired or unnamed body part without a recorded side
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = SC_DESCRIPTION
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
    return sc
