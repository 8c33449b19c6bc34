"""Write small, valid DICOM image files from numpy arrays.

Used by the tests and by the synthetic-data (phantom) generator, so that every reader path —
MONOCHROME1/2, RGB, multi-frame, big endian, deflated, RLE, JPEG 2000 — can be exercised
on files that are created on the fly instead of committed to the repository.

    write_dicom(path, pixels, photometric="MONOCHROME1", transfer_syntax=RLELossless,
                WindowCenter=[2048, 1000], WindowWidth=[4096, 500])

Compressed transfer syntaxes are encoded by pydicom where it has an encoder (RLE Lossless;
JPEG 2000 through pylibjpeg-openjpeg) and otherwise by GDCM (python-gdcm): JPEG baseline
(8-bit), JPEG extended (8/12-bit), JPEG lossless (process 14 and its selection value 1) and
JPEG-LS lossless.

Pixel values are written exactly as given: for MONOCHROME1 the caller passes pixels that are
already inverted (low = dense), the writer never transforms them.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = ["write_dicom", "encodable_transfer_syntaxes"]

# Transfer syntaxes that need no encoder: the pixel bytes are written as they are.
_NATIVE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
# Syntaxes pydicom cannot encode but GDCM can, with the name of GDCM's TransferSyntax enum.
_GDCM_ENCODED = {
    JPEGBaseline8Bit: "JPEGBaselineProcess1",
    JPEGExtended12Bit: "JPEGExtendedProcess2_4",
    JPEGLossless: "JPEGLosslessProcess14",
    JPEGLosslessSV1: "JPEGLosslessProcess14_1",
    JPEGLSLossless: "JPEGLSLossless",
}
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL")

# Modality -> SOP class, so that a CR file is a CR image and a DX file a DX image; anything
# else (including CT/MR used in tests as "wrong modality") is written as a Secondary Capture.
_SOP_CLASS = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}


def encodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes `write_dicom` can produce in this environment.

    The native ones always; compressed ones when pydicom has a working encoder plugin (RLE
    Lossless needs nothing extra, JPEG 2000 needs pylibjpeg-openjpeg; pydicom's JPEG-LS encoder
    needs pyjpegls, not a dependency of agcnn) or, failing that, when python-gdcm is installed
    (JPEG baseline, extended, lossless and JPEG-LS lossless).
    """
    out = list(_NATIVE)
    for ts in (RLELossless, JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless):
        if _pydicom_can_encode(ts):
            out.append(ts)
    if _has_gdcm():
        out.extend(ts for ts in _GDCM_ENCODED if ts not in out)
    return out


def _pydicom_can_encode(ts: UID) -> bool:
    try:
        return get_encoder(ts).is_available
    except NotImplementedError:  # pydicom has no encoder at all for this syntax
        return False


def _has_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _gdcm_recompress(path: str | os.PathLike[str], ts: UID) -> None:
    """Re-encode the uncompressed file at `path` in place with GDCM."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(os.fspath(path))
    if not reader.Read():
        raise RuntimeError(
            f"GDCM could not read back {os.fspath(path)!r} to encode it as {ts.name}"
        )
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_ENCODED[ts])))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(
            f"GDCM could not encode these pixels as {ts.name} (JPEG baseline needs 8-bit data, "
            "JPEG extended 8 or 12 bits)"
        )
    writer = gdcm.ImageWriter()
    writer.SetFileName(os.fspath(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM could not write {os.fspath(path)!r}")


def write_dicom(
    path: str | os.PathLike[str],
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
    patient_name: str = "PHANTOM^SYNTHETIC",
    patient_id: str = "PHANTOM-0000",
    **extra_tags: Any,
) -> Dataset:
    """Write `pixels` as a DICOM image file at `path` and return the dataset that was written.

    Args:
        pixels: uint8 or uint16 (int8/int16 also accepted, PixelRepresentation follows the
            dtype). Shape (rows, cols) for one grayscale frame, (frames, rows, cols) for
            multi-frame grayscale, (rows, cols, 3) for one RGB / YBR_FULL frame,
            (frames, rows, cols, 3) for multi-frame colour.
        photometric: one of MONOCHROME1, MONOCHROME2, RGB, YBR_FULL. Values are stored as given.
        transfer_syntax: a UID string; the native syntaxes always work, compressed ones when
            an encoder is installed (see `encodable_transfer_syntaxes`).
        modality: written to (0008,0060). CR and DX get their own SOP class, anything else is
            a Secondary Capture.
        **extra_tags: DICOM keywords set after the pixel data, e.g. ``WindowCenter``,
            ``RescaleSlope``, ``VOILUTSequence``. ``BitsStored`` may be set this way without
            a value-range check (the tests use that to put garbage in the unused high bits);
            ``HighBit`` then follows it unless given too.

    Every call generates new Study/Series/SOP Instance UIDs.
    """
    pixels = np.asarray(pixels)
    ts = UID(str(transfer_syntax))
    _check_arguments(pixels, photometric, ts, extra_tags)
    modality = modality.upper()
    ds = _header(_SOP_CLASS.get(modality, SecondaryCaptureImageStorage), modality, photometric, patient_name, patient_id)
    bits = pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=True)
    if "BitsStored" in extra_tags and "HighBit" not in extra_tags:
        extra_tags["HighBit"] = int(extra_tags["BitsStored"]) - 1
    for keyword, value in extra_tags.items():
        setattr(ds, keyword, value)
    return _save(ds, path, ts, pixels)


def _check_arguments(pixels: np.ndarray, photometric: str, ts: UID, extra_tags: dict[str, Any]) -> None:
    if photometric not in _PHOTOMETRICS:
        raise ValueError(
            f"photometric={photometric!r} is not supported; use one of {_PHOTOMETRICS}"
        )
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize not in (1, 2):
        raise ValueError(
            f"pixels dtype {pixels.dtype} is not supported; pass uint8 or uint16 "
            "(int8/int16 for signed data)"
        )
    if ts not in _NATIVE and not ts.is_compressed:
        raise ValueError(f"transfer_syntax={ts!r} is not a known image transfer syntax")
    unknown = sorted(k for k in extra_tags if tag_for_keyword(k) is None)
    if unknown:
        raise ValueError(
            f"extra_tags {unknown} are not DICOM keywords; use pydicom keywords such as "
            "'WindowCenter', 'RescaleSlope', 'ViewPosition'"
        )


def _header(sop_class: str, modality: str, photometric: str, patient_name: str, patient_id: str) -> Dataset:
    """The dataset of a new image with fresh UIDs, everything but its pixels."""
    now = datetime.datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # set_pixel_data needs LE first
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["DERIVED", "SECONDARY"]
        if sop_class == SecondaryCaptureImageStorage
        else ["ORIGINAL", "PRIMARY"]
    )
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "agcnn"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"  # workstation: the image was made by software
    if sop_class == DigitalXRayImageStorageForPresentation:
        ds.PresentationIntentType = "FOR PRESENTATION"
    if photometric.startswith("MONOCHROME") and sop_class != SecondaryCaptureImageStorage:
        # DX/CR: INVERSE goes with MONOCHROME1 and IDENTITY with MONOCHROME2 (PS3.3 C.8.11.7);
        # both describe the same display, they are not an extra inversion.
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    return ds


def _save(ds: Dataset, path: str | os.PathLike[str], ts: UID, pixels: np.ndarray) -> Dataset:
    """Encode the pixel data in ``ts`` and write the file; returns the dataset as written."""
    bits = pixels.dtype.itemsize * 8
    if ts in _GDCM_ENCODED and not _pydicom_can_encode(ts):
        if not _has_gdcm():
            raise RuntimeError(f"cannot encode {ts.name} here: python-gdcm is not installed")
        ds.save_as(path, enforce_file_format=True)
        _gdcm_recompress(path, ts)
        return dcmread(path)
    if ts.is_compressed:
        if not _pydicom_can_encode(ts):
            raise RuntimeError(
                f"cannot encode {ts.name} here; "
                f"encodable: {[t.name for t in encodable_transfer_syntaxes()]}"
            )
        # Lossy JPEG 2000 needs a target; lossless syntaxes take none.
        kwargs: dict[str, Any] = {}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = [10]
        ds.compress(ts, generate_instance_uid=False, **kwargs)
    elif ts == ExplicitVRBigEndian:
        if bits == 16:
            # set_pixel_data wrote little-endian words; pydicom writes OW bytes as they are.
            dtype = np.dtype(pixels.dtype).newbyteorder("<")
            words = np.frombuffer(ds.PixelData, dtype=dtype)
            ds.PixelData = words.astype(dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = ts
    else:
        ds.file_meta.TransferSyntaxUID = ts

    ds.save_as(path, enforce_file_format=True)
    return ds
