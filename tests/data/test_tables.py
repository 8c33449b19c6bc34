from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agcnn.data.tables import load_table, normalise_table, parse_label_column, split_patientwise

LABELS2 = ["Effusion", "Nodule"]


def test_missing_and_uncertain_become_nan():
    values = pd.Series(["1", "0", "", "-1", "nan", "1.0", "-1.0", None])
    out = parse_label_column(values, column="Effusion")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.to_numpy(), [1, 0, np.nan, np.nan, np.nan, 1, np.nan, np.nan])


@pytest.mark.parametrize("bad", ["2", "yes", "0.5"])
def test_bad_label_value_names_column_and_value(bad):
    with pytest.raises(ValueError, match=f"'Effusion' holds '{bad}'"):
        parse_label_column(pd.Series(["1", bad]), column="Effusion")


def test_label_map_and_absent_label(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("file,pid,pleural_fluid\na.png,p1,1\nb.png,p2,\nc.png,p3,-1\nd.png,p4,0\n")
    with pytest.warns(UserWarning, match=r"no column for labels \['Nodule'\]"):
        table = load_table(path, LABELS2, path_column="file", patient_column="pid", label_map={"pleural_fluid": "Effusion"}, test_fraction=0.25)
    assert table["path"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
    np.testing.assert_array_equal(table["Effusion"].to_numpy(), [1, np.nan, np.nan, 0])
    assert table["Nodule"].isna().all()
    assert (table["split"] == "test").sum() == 1


def test_label_map_errors():
    table = pd.DataFrame({"path": ["a"], "x": ["1"]})
    with pytest.raises(ValueError, match="not in the label list"):
        normalise_table(table, LABELS2, label_map={"x": "Nodle"}, patient_column=None)
    with pytest.raises(ValueError, match="names columns \\['y'\\]"):
        normalise_table(table, LABELS2, label_map={"y": "Nodule"}, patient_column=None)
    with pytest.raises(ValueError, match="data.path_column"):
        normalise_table(table, LABELS2, path_column="image")


def test_without_patient_column_is_refused_unless_the_config_splits_by_image():
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(50)], "Effusion": ["0"] * 50, "Nodule": ["1"] * 50})
    with pytest.raises(ValueError, match=r"no patient column 'patient'.*data.image_wise_split: true"):
        normalise_table(table, LABELS2, patient_column="patient", val_fraction=0.1, test_fraction=0.2)
    with pytest.warns(UserWarning, match="patients may|one patient"):
        out = normalise_table(table, LABELS2, patient_column="patient", val_fraction=0.1, test_fraction=0.2,
                              image_wise=True)
    assert out["split"].value_counts().to_dict() == {"train": 35, "test": 10, "val": 5}


@pytest.mark.parametrize("raw, want", [
    ("13", "13"), ("00000013", "13"), (" 13 ", "13"), ("0013\t", "13"), ("000", "0"), ("0", "0"),
    ("P0013", "p0013"), (" p0013", "p0013"), ("AbC-7", "abc-7"), ("١٣", "١٣"),  # Arabic-Indic digits stay as written
])
def test_patient_ids_have_one_normal_form(raw, want):
    from agcnn.data.tables import normalise_patient_id

    assert normalise_patient_id(raw) == want


def test_padded_and_spaced_ids_are_one_patient_when_splitting():
    # Three spellings of patient 13 and two of patient p7: each patient lands in one split only.
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(6)],
                          "patient": ["13", "00000013", " 13", "P7", "p7 ", "8"],
                          "Effusion": ["0"] * 6, "Nodule": ["1"] * 6})
    for seed in range(6):
        out = normalise_table(table, LABELS2, val_fraction=0.3, test_fraction=0.3, split_seed=seed)
        assert out["patient"].tolist() == ["13", "13", "13", "p7", "p7", "8"]
        assert out.groupby("patient")["split"].nunique().max() == 1
    mixed = table.assign(split=["train", "test", "train", "train", "train", "test"])
    with pytest.raises(ValueError, match="patient '13' has images in more than one split"):
        normalise_table(mixed, LABELS2)


def test_an_empty_patient_id_names_its_row():
    table = pd.DataFrame({"path": ["a.png", "b.png"], "patient": ["p1", "  "], "Effusion": ["0", "1"], "Nodule": ["1", "0"]})
    with pytest.raises(ValueError, match="row 3 has an empty patient ID in column 'patient'"):
        normalise_table(table, LABELS2)


def test_split_column_is_honoured_and_val_carved_from_train():
    table = pd.DataFrame({
        "path": [f"{i}.png" for i in range(40)],
        "patient": [f"p{i // 2}" for i in range(40)],
        "split": ["train"] * 30 + ["test"] * 10,
        "Effusion": ["1"] * 40, "Nodule": ["0"] * 40,
    })
    out = normalise_table(table, LABELS2, val_fraction=0.2)
    assert (out["split"][30:] == "test").all()
    assert (out["split"][:30] == "val").sum() == 6
    assert out.groupby("patient")["split"].nunique().max() == 1


def test_split_column_leaking_a_patient_is_an_error():
    table = pd.DataFrame({"path": ["a", "b"], "patient": ["p", "p"], "split": ["train", "test"], "Effusion": ["1", "0"], "Nodule": ["0", "0"]})
    with pytest.raises(ValueError, match="patient 'p' has images in more than one split"):
        normalise_table(table, LABELS2)
    table["split"] = ["train", "later"]
    with pytest.raises(ValueError, match="use train, val or test"):
        normalise_table(table, LABELS2)


def test_split_patientwise_is_deterministic_and_order_free():
    df = pd.DataFrame({"patient": [f"p{i % 37}" for i in range(200)]})
    a = split_patientwise(df, 0.2, seed=3)
    b = split_patientwise(df.iloc[::-1], 0.2, seed=3).sort_index()
    assert (a == b).all()
    assert df.assign(s=a).groupby("patient")["s"].nunique().max() == 1
    assert a[df["patient"].drop_duplicates().index].eq("val").sum() == 7
    assert not (split_patientwise(df, 0.2, seed=4) == a).all()
    with pytest.raises(ValueError, match="val_fraction"):
        split_patientwise(df, 1.5, seed=0)
