"""agcnn.data.scope: which DICOM headers are frontal chest radiographs."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from agcnn.data import scope
from agcnn.data.dicom_write import write_dicom
from agcnn.data.readers import UnusableImageError, read_image_with_info
from agcnn.data.scope import ScopePolicy, decide


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        if k.endswith("Sequence"):
            v = [_code(*v)]
        setattr(ds, k, v)
    return ds


CHEST = ("816094009", "SCT", "Chest")
HIP = ("29836001", "SCT", "Hip")
LATERAL = ("399067008", "SCT", "lateral")
AP = ("399348003", "SCT", "antero-posterior")

# (header, expected reason, a word the message or a note must hold)
CASES = [
    (dict(BodyPartExamined="CHEST", ViewPosition="PA"), None, None),
    (dict(BodyPartExamined="chest", ViewPosition="ap"), None, None),
    (dict(BodyPartExamined="THORAX", ViewPosition="AP"), None, None),
    (dict(BodyPartExamined="HIP", ViewPosition="AP"), "out_of_scope", "BodyPartExamined is 'HIP'"),
    (dict(BodyPartExamined="HAND"), "out_of_scope", "'HAND'"),
    (dict(BodyPartExamined="TSPINE", ViewPosition="LL"), "out_of_scope", "TSPINE"),
    (dict(AnatomicRegionSequence=HIP, ViewPosition="PA"), "out_of_scope", "Anatomic Region Sequence is (29836001, SCT, 'Hip')"),
    (dict(AnatomicRegionSequence=CHEST, ViewPosition="PA"), None, None),
    (dict(AnatomicRegionSequence=("T-D3000", "SRT", "Chest"), ViewPosition="PA"), None, None),
    # Body Part Examined wins over the sequence when both are present.
    (dict(BodyPartExamined="CHEST", AnatomicRegionSequence=HIP), None, "view not checked"),
    (dict(BodyPartExamined="CHEST", ViewPosition="LL"), "not_frontal", "'LL' (left lateral)"),
    (dict(BodyPartExamined="CHEST", ViewPosition="RL"), "not_frontal", "right lateral"),
    (dict(BodyPartExamined="CHEST", ViewPosition="LATERAL"), "not_frontal", "LATERAL"),
    (dict(BodyPartExamined="CHEST", ViewPosition="RLO"), "not_frontal", "oblique"),
    (dict(BodyPartExamined="CHEST", ViewPosition="LLD"), "not_frontal", "decubitus"),
    (dict(BodyPartExamined="CHEST", ViewPosition="LEFT LATERAL"), "not_frontal", "LEFT LATERAL"),
    (dict(BodyPartExamined="CHEST", ViewCodeSequence=LATERAL), "not_frontal", "(399067008, SCT, 'lateral')"),
    (dict(BodyPartExamined="CHEST", ViewCodeSequence=("R-10236", "SRT", "left lateral")), "not_frontal", "R-10236"),
    (dict(BodyPartExamined="CHEST", ViewCodeSequence=AP), None, None),
    # AP supine: frontal, with a note, wherever the supine position is written.
    (dict(BodyPartExamined="CHEST", ViewPosition="AP", PatientPosition="HFS"), None, "AP supine"),
    (dict(BodyPartExamined="CHEST", ViewPosition="AP SUPINE"), None, "AP supine"),
    (dict(BodyPartExamined="CHEST", ViewCodeSequence=AP,
          PatientOrientationModifierCodeSequence=("40199007", "SCT", "supine")), None, "AP supine"),
    # Missing attributes: predicted, with notes that say what was not checked.
    (dict(), None, "body part not checked"),
    (dict(BodyPartExamined="", ViewPosition=""), None, "view not checked: no ViewPosition"),
    (dict(BodyPartExamined="CHEST", ViewPosition="XYZ"), None, "'XYZ' is not a known term"),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case values, as some consoles write
@pytest.mark.parametrize("header,reason,text", CASES)
def test_decide(header, reason, text):
    d = decide(_ds(**header))
    assert d.reason == reason, (header, d)
    if text is not None:
        assert text in (d.message if reason else " | ".join(d.notes)), (header, d)
    if reason is None:
        assert d.message == ""


def test_overrides_switch_each_check_off():
    hip_lateral = _ds(BodyPartExamined="HIP", ViewPosition="LL")
    assert decide(hip_lateral, ScopePolicy(any_body_part=True)).reason == "not_frontal"
    assert decide(hip_lateral, ScopePolicy(any_view=True)).reason == "out_of_scope"
    d = decide(hip_lateral, ScopePolicy(any_body_part=True, any_view=True))
    assert d.reason is None and d.notes == []
    # Switched-off checks leave no "not checked" note either.
    assert decide(_ds(), ScopePolicy(any_body_part=True, any_view=True)).notes == []


def test_code_tables_match_the_dicom_dictionary():
    # The SNOMED CT values written in scope.py are those of pydicom's copy of PS3.16.
    def sct(name):
        return ("SCT", getattr(codes.SCT, name).value)

    assert sct("Chest") in scope.CHEST_REGION_CODES and sct("Lung") in scope.CHEST_REGION_CODES
    assert sct("ChestAndAbdomen") in scope.CHEST_REGION_CODES and sct("Mediastinum") in scope.CHEST_REGION_CODES
    for name in ("AnteroPosterior", "PosteroAnterior", "Frontal"):
        assert sct(name) in scope.FRONTAL_VIEW_CODES
    for name in ("LateralProjection", "LeftLateral", "RightLateral", "ObliqueProjection", "RightPosteriorOblique",
                 "LeftAnteriorOblique", "PosteroAnteriorOblique"):
        assert sct(name) in scope.NOT_FRONTAL_VIEW_CODES
    assert sct("Supine") in scope.SUPINE_CODES


def _pixels() -> np.ndarray:
    return (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 2) % 4096


def test_reader_skips_before_decoding_and_notes_what_it_could_not_check(tmp_path):
    policy = ScopePolicy()
    hip = tmp_path / "hip.dcm"
    write_dicom(hip, _pixels(), modality="CR", BodyPartExamined="HIP", ViewPosition="AP")
    with pytest.raises(UnusableImageError) as e:
        read_image_with_info(hip, scope=policy)
    assert e.value.reason == "out_of_scope" and "'HIP'" in str(e.value)
    # A cut hip film is still out of scope (its nature), not a failure.
    data = hip.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 500])
    with pytest.raises(UnusableImageError) as e:
        read_image_with_info(cut, scope=policy)
    assert e.value.reason == "out_of_scope"
    # Without a policy the reader reads anything, as before.
    read_image_with_info(hip)

    lat = tmp_path / "lat.dcm"
    write_dicom(lat, _pixels(), modality="DX", ViewPosition="LL")
    with pytest.raises(UnusableImageError) as e:
        read_image_with_info(lat, scope=policy)
    assert e.value.reason == "not_frontal"

    bare = tmp_path / "bare.dcm"
    write_dicom(bare, _pixels(), modality="DX", BodyPartExamined=None)
    _, info = read_image_with_info(bare, scope=policy)
    assert "body part not checked: no BodyPartExamined or Anatomic Region Sequence" in info.notes
    assert "view not checked: no ViewPosition or View Code Sequence" in info.notes

    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray((_pixels() // 16).astype(np.uint8)).save(png)
    _, info = read_image_with_info(png, scope=policy)
    assert "body part and view not checked: PNG files carry no such attributes" in info.notes
    assert not read_image_with_info(png)[1].notes


def test_training_dataset_and_cache_apply_the_scope(tmp_path):
    import pandas as pd

    from agcnn.data.cache import build_cache
    from agcnn.data.datasets import ImageLoadError, XrayDataset

    write_dicom(tmp_path / "pa.dcm", _pixels(), modality="DX", ViewPosition="PA")
    write_dicom(tmp_path / "lat.dcm", _pixels(), modality="DX", ViewPosition="LL")
    write_dicom(tmp_path / "hip.dcm", _pixels(), modality="CR", BodyPartExamined="HIP")
    table = pd.DataFrame({"path": ["pa.dcm", "lat.dcm", "hip.dcm"], "Mass": [0.0, 1.0, 0.0]})
    ds = XrayDataset(table, ["Mass"], root=tmp_path, scope=ScopePolicy())
    assert ds.load(0).shape == (48, 40)
    with pytest.raises(ImageLoadError, match=r"not_frontal: ViewPosition is 'LL'.*data.any_view: true trains on it"):
        ds.load(1)
    with pytest.raises(ImageLoadError, match=r"out_of_scope: BodyPartExamined is 'HIP'.*data.any_body_part: true"):
        ds.without_rows([0]).load(1)  # the policy survives without_rows
    assert XrayDataset(table, ["Mass"], root=tmp_path, scope=ScopePolicy(any_view=True)).load(1).shape == (48, 40)

    report = build_cache(tmp_path / "cache", table["path"].tolist(), tmp_path, size=16, workers=0, scope=ScopePolicy())
    assert sorted((p, r.split(":")[0]) for p, r in report.unusable) == [("hip.dcm", "out_of_scope"),
                                                                        ("lat.dcm", "not_frontal")]
    # Switching a check off is another cache: rebuilt, and the lateral is decoded this time.
    report = build_cache(tmp_path / "cache", table["path"].tolist(), tmp_path, size=16, workers=0,
                         scope=ScopePolicy(any_view=True))
    assert [p for p, _ in report.unusable] == ["hip.dcm"]
