"""agcnn.dicom_out: the SR and Secondary Capture read back with pydicom and highdicom."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from agcnn.data.dicom_write import write_dicom
from agcnn.dicom_out import (
    CODING_SCHEME,
    NOT_FOR_DIAGNOSIS,
    DicomResult,
    SourceError,
    object_paths,
    render_overlay,
    write_dicom_results,
)
from agcnn.labels import LABELS

H, W = 120, 100


def text_items(ds) -> dict[str, list[str]]:
    """Every TEXT content item of an SR, by concept name meaning."""
    out: dict[str, list[str]] = {}

    def walk(items):
        for item in items:
            if item.get("ValueType") == "TEXT":
                out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def read_sr_values(path):
    """(probabilities, calls, region corners, region source UID) read back with highdicom."""
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    probs = {m.name.value: m.value for m in group.get_measurements()}
    calls = {q.name.value: q.value for q in group.get_qualitative_evaluations()}
    (roi_group,) = sr.content.get_planar_roi_measurement_groups()
    roi = roi_group.roi
    source_uid = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return sr, probs, calls, roi.value, source_uid


@pytest.fixture
def source(tmp_path):
    pixels = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 7) % 4096
    path = tmp_path / "in" / "chest.dcm"
    path.parent.mkdir()
    ds = write_dicom(path, pixels, modality="DX", ViewPosition="PA", patient_name="DOE^JANE", patient_id="PID-1",
                     AccessionNumber="ACC-9")
    return path, ds


def _result(**kw) -> DicomResult:
    probs = [round(0.05 + 0.06 * j, 4) for j in range(len(LABELS))]
    probs[3] = None  # a NaN probability is left out, not written as a number
    thresholds = [0.5] * len(LABELS)
    thresholds[0] = None  # no operating point for this finding: no call
    args = dict(labels=LABELS, probabilities=probs, thresholds=thresholds, box=(10, 20, 60, 90),
                algorithm_version="9.9.9", checkpoint_sha256="c0ffee" * 10 + "abcd")
    args.update(kw)
    return DicomResult(**args)


def _picture(result) -> np.ndarray:
    preview = np.linspace(0, 255, H * W).reshape(H, W).astype(np.uint8)
    return render_overlay(preview, height=H, width=W, box=result.box, field=(0, 0, W, H), heat=np.eye(8))


def test_objects_read_back_with_references_and_values(source, tmp_path):
    src_path, src = source
    result = _result()
    out = tmp_path / "dicom"
    sr_path, sc_path = write_dicom_results(out, "a/chest.dcm", src_path, result, picture=_picture(result),
                                           map_name="attention heatmap")
    assert (sr_path, sc_path) == object_paths(out, "a/chest.dcm")
    assert sorted(p.name for p in (out / "a").iterdir()) == ["chest.dcm.sc.dcm", "chest.dcm.sr.dcm"]  # no temp files

    sr, probs, calls, corners, source_uid = read_sr_values(sr_path)
    assert sr.SOPClassUID == ComprehensiveSRStorage
    # Patient and study modules come from the source; the objects' own UIDs are new.
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(kw) == src.get(kw), kw
    assert sr.SOPInstanceUID != src.SOPInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    # The evidence and the region's source image are the source instance.
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == src.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert source_uid == src.SOPInstanceUID
    # Values: one probability per finding that has one, one call per finding with an operating point.
    expected = {lab: p for lab, p in zip(LABELS, result.probabilities) if p is not None}
    assert probs == pytest.approx(expected)
    assert set(calls) == {f"{lab}-call" for lab, t, p in zip(LABELS, result.thresholds, result.probabilities)
                          if t is not None and p is not None}
    for lab, p in expected.items():
        if f"{lab}-call" in calls:
            assert calls[f"{lab}-call"] == (codes.SCT.Present if p >= 0.5 else codes.SCT.Absent)
    np.testing.assert_array_equal(corners, [[10, 20], [60, 20], [60, 90], [10, 90], [10, 20]])
    group = sr.content.get_image_measurement_groups()[0]
    assert all(m.name.scheme_designator == CODING_SCHEME for m in group.get_measurements())
    texts = text_items(sr)
    assert texts["Algorithm Name"][0] == result.algorithm_name
    assert texts["Algorithm Version"][0] == "9.9.9"
    params = texts["Algorithm Parameters"]
    assert f"checkpoint sha256 {result.checkpoint_sha256}" in params
    assert any(p.startswith("operating points Atelectasis none, Cardiomegaly 0.5") for p in params)
    assert "probabilities: raw model output, no calibration" in params

    sc = pydicom.dcmread(sc_path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments and "not for diagnosis" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.PatientID == src.PatientID and sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SOPInstanceUID not in (src.SOPInstanceUID, sr.SOPInstanceUID)
    assert sc.pixel_array.shape == (H, W, 3) and sc.PhotometricInterpretation == "RGB"
    # The box is drawn in green on the picture's grid (same size as the source here).
    px = sc.pixel_array
    assert tuple(px[50, 10]) == (0, 255, 0) and tuple(px[20, 30]) == (0, 255, 0)


def test_the_sr_names_the_calibration_of_its_probabilities(source, tmp_path):
    src_path, _ = source
    line = "platt calibration 0123456789ab (fitted on the table site.csv, 240 images)"
    result = _result(calibration=line)
    sr_path, _ = write_dicom_results(tmp_path / "dicom", "chest.dcm", src_path, result, picture=_picture(result),
                                     map_name="attention heatmap")
    assert f"probabilities: {line}" in text_items(read_sr_values(sr_path)[0])["Algorithm Parameters"]


def test_writing_again_replaces_the_pair_with_new_uids(source, tmp_path):
    src_path, _ = source
    result = _result()
    out = tmp_path / "dicom"
    first = [pydicom.dcmread(p) for p in write_dicom_results(
        out, "chest.dcm", src_path, result, picture=_picture(result), map_name="m")]
    second = write_dicom_results(out, "chest.dcm", src_path, result, picture=_picture(result), map_name="m")
    assert sorted(p.name for p in out.iterdir()) == ["chest.dcm.sc.dcm", "chest.dcm.sr.dcm"]
    again = [pydicom.dcmread(p) for p in second]
    assert not {d.SOPInstanceUID for d in again} & {d.SOPInstanceUID for d in first}
    # Same model, same study: each kind of object stays in its series across runs.
    assert [d.SeriesInstanceUID for d in again] == [d.SeriesInstanceUID for d in first]
    assert again[0].SeriesInstanceUID != again[1].SeriesInstanceUID


def test_source_without_uids_is_refused(tmp_path):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    result = _result()
    with pytest.raises(SourceError, match="SeriesInstanceUID"):
        write_dicom_results(tmp_path, "x.dcm", ds, result, picture=_picture(result), map_name="m")
