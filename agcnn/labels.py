"""The label contract: the 14 ChestX-ray14 findings in the NIH order.

This is the only place the list is written down. Every checkpoint and every output file
carries the list it was made with, and :func:`check_labels` refuses a mismatch.

The paper's label vector has 15 entries: these 14 and "No Finding" (Guan et al., Sec. 4.1). With
``model.no_finding`` the classifiers get that 15th output as an extra training target (see
:func:`agcnn.metrics.with_no_finding`); it is not a finding and not part of this list, so
checkpoints, AUC tables, operating points and prediction files keep exactly these 14 columns.
"""

from __future__ import annotations

from collections.abc import Sequence

from agcnn.errors import EXIT_USAGE, AgcnnError

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

NUM_CLASSES = len(LABELS)

# Name of the optional 15th output (model.no_finding); never a column of an output file.
NO_FINDING = "No Finding"


class LabelMismatchError(AgcnnError, ValueError):
    """Two label lists that must be identical (same names, same order) are not."""

    exit_code = EXIT_USAGE


def check_labels(found: Sequence[str], expected: Sequence[str] = LABELS, *, where: str = "checkpoint") -> None:
    """Raise :class:`LabelMismatchError` unless ``found`` equals ``expected`` name for name, in order."""
    found, expected = list(found), list(expected)
    if found == expected:
        return
    if sorted(found) == sorted(expected):
        first = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        raise LabelMismatchError(
            f"the {where} has the same labels in a different order: position {first} is "
            f"{found[first]!r}, expected {expected[first]!r}. Outputs would be assigned to the wrong "
            f"findings; re-export with the label order {expected}."
        )
    missing = [x for x in expected if x not in found]
    extra = [x for x in found if x not in expected]
    raise LabelMismatchError(
        f"the {where} labels differ from the expected list: missing {missing}, unexpected {extra}. "
        f"Expected, in order: {expected}."
    )
