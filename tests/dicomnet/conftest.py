"""The DICOM network tests' fixtures live in ``pacs.py`` (a module name of its own, so test files can
import its helpers whatever other ``conftest`` pytest loaded last)."""

from pacs import node_checkpoint, orthanc, study_files  # noqa: F401 - fixtures registered for this folder
