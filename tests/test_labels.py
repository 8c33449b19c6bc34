from __future__ import annotations

import pytest

from agcnn.labels import LABELS, LabelMismatchError, check_labels


def test_nih_order():
    assert LABELS[:3] == ("Atelectasis", "Cardiomegaly", "Effusion")
    assert LABELS[-2:] == ("Pleural_Thickening", "Hernia")
    assert len(LABELS) == len(set(LABELS)) == 14


def test_reordered_labels_rejected_with_position():
    swapped = list(LABELS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(LabelMismatchError, match="different order: position 0 is 'Cardiomegaly'"):
        check_labels(swapped)


def test_missing_and_extra_labels_named():
    with pytest.raises(LabelMismatchError, match=r"missing \['Hernia'\], unexpected \['Fracture'\]"):
        check_labels(list(LABELS[:-1]) + ["Fracture"])
    check_labels(list(LABELS))
