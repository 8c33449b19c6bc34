"""Read one chest radiograph (DICOM, PNG or JPEG) into a float32 array in [0, 1].

Every image, whatever its source, comes out with the same contract:

* ``float32`` numpy array of shape (H, W), the first frame's original pixel size;
* MONOCHROME2 semantics: bright = dense, bones bright (MONOCHROME1 files are inverted);
* values in [0, 1], scaled as follows:

  - DICOM grayscale: stored values -> Modality LUT (Modality LUT Sequence, or Rescale Slope /
    Intercept) -> VOI, then
      * VOI LUT Sequence (first item; preferred over a window when both are present, as pydicom
        does): the LUT output range [min(LUT Data), max(LUT Data)] maps linearly onto [0, 1].
        The LUT's own min/max rather than its nominal bit depth, because many LUTs declare
        16 bits and use 12;
      * else Window Center / Width (first pair): the window maps linearly onto [0, 1] with the
        VOI LUT Function of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) in place of its
        output range [ymin, ymax]; values outside the window clip to 0 or 1;
      * else (or when the window / LUT is unusable): min-max of the modality-transformed frame,
        a constant frame gives all zeros;
    -> ``1 - y`` for MONOCHROME1, and for MONOCHROME2 with Presentation LUT Shape INVERSE
    (PS3.3 C.11.6: the displayed image is the inverted one).
  - DICOM colour (RGB, YBR_*, PALETTE COLOR): converted to RGB (pydicom does YBR_FULL(_422);
    the JPEG 2000 codec undoes YBR_ICT/RCT), gray = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601
    luma), divided by 2**BitsStored - 1 (palette: by the max of the palette's output type).
  - PNG / JPEG: gray, RGB or RGBA (alpha dropped) at 8 or 16 bits; colour -> BT.601 luma;
    8-bit: divided by 255. 16-bit PNG: divided by ``2**bits - 1`` where ``bits`` is the number
    of significant bits, from the ``sBIT`` chunk when present, else the highest set bit of the
    image (with a note), so 12-bit data exported unscaled into a 16-bit PNG is not shown
    near-black; data that fills the upper bits (scaled up as the PNG standard asks) is divided
    by 65535. No windowing: these files are already rendered for display.

A file that cannot be used raises `UnusableImageError` and nothing else: its ``.reason`` is
one of `REASONS` (stable codes for a batch report) and ``str(e)`` says what was found and
what would fix it. Messages and notes never contain patient identifiers or the file path (a
path from a PACS export often contains the patient's name); the caller pairs them with the
path it passed.

Formats are recognised by content, never by file extension (PACS exports are often called
``IM000123`` or ``*.dcm`` whatever they contain).

DICOM modalities: CR, DX, DR and RG are read; OT, SC or no Modality are read as secondary
captures (with a note); anything else (CT, MR, US, NM, PT, MG, XA, ...) is
"unsupported_modality". Body part and view are checked only when the caller passes a scope
policy (see `agcnn.data.scope`): "out_of_scope" / "not_frontal".

Codecs (pydicom plugins): JPEG 2000 and RLE go to pylibjpeg only (see `_decoding_plugin`);
JPEG baseline / extended / lossless and JPEG-LS go to GDCM; 12-bit JPEG Extended, which
pydicom's GDCM plugin refuses, is decoded with GDCM directly.

Known limits: a damaged JPEG 2000 / JPEG stream that still ends with its end marker can decode
into a degraded image without any error (those codecs are built to survive damage); the VOI
and rescale of enhanced multi-frame objects (functional group sequences) are not read, such
files fall back to min-max.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agcnn.errors import AgcnnError

if TYPE_CHECKING:
    from agcnn.data.scope import ScopePolicy

__all__ = [
    "REASONS",
    "RADIOGRAPH_MODALITIES",
    "UnusableImageError",
    "ImageInfo",
    "sniff_format",
    "check_header",
    "read_image",
    "read_image_with_info",
]

REASONS = (
    "not_an_image",  # not DICOM, PNG or JPEG by content
    "no_pixel_data",  # a DICOM object that is not an image: SR, presentation state, KOS, DICOMDIR
    "unsupported_modality",  # an image, but not a projection radiograph (CT, MR, US, MG, ...)
    "truncated",  # cut short: pixel data shorter than the header says, or header incomplete
    "decode_error",  # corrupt data, or a compression / pixel layout that cannot be decoded
    "unreadable",  # missing, a directory, permission denied, I/O error
    "implausible_size",  # a side < MIN_SIDE or > MAX_SIDE, absurd aspect ratio, huge file
    "empty_file",  # 0 bytes
    "out_of_scope",  # a radiograph of another body part (agcnn.data.scope; only when asked)
    "not_frontal",  # a lateral / oblique / decubitus view (agcnn.data.scope; only when asked)
)

# Size limits. Below 32 px there is nothing to classify (and the network's five stride-2
# stages would reduce it to nothing); above 16384 px a side the file is either not a
# radiograph or its header is wrong, and decoding it risks exhausting memory. Chest films
# are near-square; 8:1 is far beyond even stitched long-length (spine / leg) exposures.
MIN_SIDE = 32
MAX_SIDE = 16384
MAX_ASPECT = 8.0
MAX_FILE_BYTES = 2 * 1024**3

# Projection radiographs. MG is a projection radiograph too, but of the breast: the 14
# ChestX-ray14 findings mean nothing there, so it is rejected like CT and MR.
# "DR" is not a DICOM modality code but some vendors write it for DX.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
# Secondary captures of radiographs (scanned films, exports re-wrapped by software) carry
# OT, the non-standard SC, or no modality at all: accepted, with a note saying so.
_ASSUMED_RADIOGRAPH_MODALITIES = frozenset({"OT", "SC", ""})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_SNIFF_BYTES = 256

# All two-letter DICOM VRs, to tell a preamble-less explicit-VR file from random bytes.
_VRS = frozenset(
    vr.encode()
    for vr in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
        "UC UI UL UN UR US UT UV"
    ).split()
)

# Elements whose values must never reach a message (see the module docstring).
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
)
_MAX_DETAIL = 300  # characters of a wrapped library message kept in our message


class UnusableImageError(AgcnnError):
    """A file that cannot be used. `.reason` is a short stable code, str(e) the human message."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; valid reasons: {', '.join(REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Default pickling would call __init__(message) only; DataLoader workers pickle
        # exceptions to send them to the main process.
        return (type(self), (self.reason, self.message))

    def __repr__(self) -> str:
        return f"UnusableImageError({self.reason!r}, {self.message!r})"


@dataclass
class ImageInfo:
    format: str  # "dicom" | "png" | "jpeg"
    height: int  # pixel size of the returned array (the file's first frame)
    width: int
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    photometric: str | None = None  # as found in the file; PNG/JPEG: "GRAY", "RGB", "RGBA"
    notes: list[str] = field(default_factory=list)
    # DICOM: the header as parsed, without the pixel data (it holds identifiers: never log it).
    header: Any = None


# --------------------------------------------------------------------------------------
# public functions


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """ "dicom", "png", "jpeg" or None, from the first bytes of the file (never its extension).

    DICOM is recognised by "DICM" at offset 128, or, without the 128-byte preamble, by a first
    element in group 0x0002 (file meta) or 0x0008 in explicit or implicit VR little endian
    (or explicit VR big endian). Raises UnusableImageError("unreadable" / "empty_file") when
    the file cannot be read at all.
    """
    head = _read_bytes(path, limit=_SNIFF_BYTES)
    return _sniff_bytes(head)


def check_header(path: str | os.PathLike[str], *, scope: ScopePolicy | None = None) -> str:
    """ "dicom", "png" or "jpeg" from the first bytes, as :func:`sniff_format`; a file that is
    not one of them raises UnusableImageError("not_an_image") saying what it looks like (an
    HTML page, an archive, ...). A DICOM file's header (not its pixels) is also read for what
    :func:`read_image` would refuse before decoding: another modality, and with ``scope`` another
    body part or view. A check of a whole table before training, not a promise that the pixels
    decode."""
    head = _read_bytes(path, limit=_SNIFF_BYTES)
    fmt = _sniff_bytes(head)
    if fmt is None:
        raise UnusableImageError("not_an_image", _describe_unknown(head, size=os.stat(path).st_size))
    if fmt == "dicom":
        _check_dicom_header(path, has_preamble=head[128:132] == b"DICM", scope=scope)
    return fmt


# The attributes check_header needs: modality (_check_modality) and scope (agcnn.data.scope).
_HEADER_TAGS = ("SOPClassUID", "Modality", "BodyPartExamined", "AnatomicRegionSequence", "ViewPosition",
                "ViewCodeSequence", "PatientOrientationModifierCodeSequence")


def _check_dicom_header(path: str | os.PathLike[str], *, has_preamble: bool, scope: ScopePolicy | None) -> None:
    from pydicom import dcmread

    with warnings.catch_warnings():
        # Parser warnings can quote element values (identifiers); a damaged header is reported
        # when the file is decoded, with the detail read_image gives.
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True, force=not has_preamble, specific_tags=list(_HEADER_TAGS))
        except Exception:  # noqa: BLE001 - left to read_image, which says what is wrong
            return
    _check_modality(ds, [])
    if scope is not None:
        from agcnn.data.scope import decide

        decision = decide(ds, scope)
        if decision.reason:
            raise UnusableImageError(decision.reason, decision.message)


def read_image(path: str | os.PathLike[str], *, scope: ScopePolicy | None = None) -> np.ndarray:
    """float32 (H, W) in [0, 1], MONOCHROME2 semantics; see the module docstring for scaling."""
    return read_image_with_info(path, scope=scope)[0]


def read_image_with_info(
    path: str | os.PathLike[str], *, scope: ScopePolicy | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """Like `read_image`, plus an `ImageInfo` with UIDs and notes on what was done.

    With ``scope`` (a :class:`agcnn.data.scope.ScopePolicy`), a DICOM file whose header names
    another body part or a non-frontal view raises "out_of_scope" / "not_frontal" before its
    pixels are decoded; PNG / JPEG files, which carry no such attributes, get a note.
    """
    try:
        data = _read_bytes(path)
        fmt = _sniff_bytes(data)
        if fmt is None:
            raise UnusableImageError("not_an_image", _describe_unknown(data))
        if fmt == "dicom":
            return _read_dicom(data, scope)
        out, info = _read_raster(data, fmt)
        if scope is not None and not (scope.any_body_part and scope.any_view):
            info.notes.append(f"body part and view not checked: {fmt.upper()} files carry no such attributes")
        return out, info
    except UnusableImageError:
        raise
    except MemoryError as exc:
        raise UnusableImageError(
            "implausible_size",
            "ran out of memory while decoding; the image is larger than this machine can "
            "hold (free memory or use fewer loader workers)",
        ) from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 — the contract: a bad file raises nothing else
        # BaseException: Rust codecs (pylibjpeg-*) report bugs as pyo3 PanicException.
        raise UnusableImageError(
            "decode_error", f"could not be decoded ({type(exc).__name__}: {_short(exc)})"
        ) from exc


# --------------------------------------------------------------------------------------
# bytes and format sniffing


def _read_bytes(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UnusableImageError(
                "unreadable", "is a directory, not a file; pass the files inside it"
            )
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO or device would block or never end.
            raise UnusableImageError(
                "unreadable", "is not a regular file (a pipe, socket or device)"
            )
        if st.st_size == 0:
            raise UnusableImageError(
                "empty_file", "file is empty (0 bytes); re-export it from the source"
            )
        if limit is None and st.st_size > MAX_FILE_BYTES:
            raise UnusableImageError(
                "implausible_size",
                f"file is {st.st_size / 1024**3:.1f} GiB, above the {MAX_FILE_BYTES / 1024**3:.0f} GiB "
                "limit for one radiograph; it is probably a multi-frame series, not a chest film",
            )
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except UnusableImageError:
        raise
    except FileNotFoundError as exc:
        raise UnusableImageError("unreadable", "file not found; check the path") from exc
    except IsADirectoryError as exc:
        raise UnusableImageError(
            "unreadable", "is a directory, not a file; pass the files inside it"
        ) from exc
    except PermissionError as exc:
        raise UnusableImageError(
            "unreadable", "permission denied; give the reading user read access to the file"
        ) from exc
    except OSError as exc:
        raise UnusableImageError(
            "unreadable", f"I/O error while reading ({exc.strerror or exc})"
        ) from exc
    if not data:
        raise UnusableImageError(
            "empty_file", "file is empty (0 bytes); re-export it from the source"
        )
    return data


def _sniff_bytes(head: bytes) -> str | None:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if _is_preambleless_dicom(head):
        return "dicom"
    return None


def _is_preambleless_dicom(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group_le, _ = struct.unpack_from("<HH", head)
    group_be, _ = struct.unpack_from(">HH", head)
    explicit = head[4:6] in _VRS
    if group_le in (0x0002, 0x0008):
        if explicit:
            return True
        # Implicit VR: a 4-byte length follows the tag; DICOM lengths are even (or undefined).
        (length,) = struct.unpack_from("<I", head, 4)
        return length == 0xFFFFFFFF or (length % 2 == 0 and length < 0x01000000)
    # Big endian exists only as explicit VR, and the file meta (group 2) is always little endian.
    return group_be == 0x0008 and explicit


def _describe_unknown(data: bytes, size: int | None = None) -> str:
    head = data[:512]
    kind = ""
    archives = {
        b"\x1f\x8b": "a gzip archive",
        b"PK\x03\x04": "a zip archive",
        b"BZh": "a bzip2 archive",
        b"\xfd7zXZ": "an xz archive",
    }
    images = {b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"BM": "a BMP image"}
    for magic, name in archives.items():
        if head.startswith(magic):
            kind = f" It is {name}: unpack it and read the files inside."
    for magic, name in images.items():
        if head.startswith(magic):
            kind = f" It is {name}: convert it to PNG."
    if not kind and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            lowered = text.lstrip().lower()
            kind = (
                " It looks like HTML (an error page saved instead of the image?)."
                if (lowered.startswith("<!doctype html") or lowered.startswith("<html"))
                else " It looks like a text file."
            )
    return (
        f"content is not DICOM, PNG or JPEG (no 'DICM' marker at byte 128, no PNG/JPEG "
        f"signature, {len(data) if size is None else size} bytes).{kind} Only DICOM, PNG and JPEG are read."
    )


def _short(exc: BaseException, ds: Any = None) -> str:
    """A library's message, cut to length and with identifying values removed."""
    msg = " ".join(str(exc).split())
    if ds is not None:
        for keyword in _IDENTIFYING_KEYWORDS:
            try:
                value = str(ds.get(keyword, "") or "")
            except Exception:  # noqa: BLE001 — a malformed value must not break error reporting
                continue
            if len(value) >= 2:
                msg = msg.replace(value, f"<{keyword}>")
    return msg[:_MAX_DETAIL] + ("..." if len(msg) > _MAX_DETAIL else "")


def _check_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise UnusableImageError(
            "implausible_size",
            f"image is {height}x{width} px; a radiograph must be {MIN_SIDE} to {MAX_SIDE} px a side",
        )
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UnusableImageError(
            "implausible_size",
            f"image is {height}x{width} px, an aspect ratio above {MAX_ASPECT:g}:1; "
            "this is not a chest radiograph (or its Rows/Columns are wrong)",
        )


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of (..., 3) RGB; the weights sum to 1, so gray stays gray."""
    rgb = rgb.astype(np.float64, copy=False)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _finish(y: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(y)):
        raise UnusableImageError(
            "decode_error",
            "pixel values are not finite after rescaling (check RescaleSlope/Intercept or the LUTs)",
        )
    return np.ascontiguousarray(np.clip(y, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------------------
# PNG / JPEG


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise UnusableImageError("truncated", "PNG header (IHDR chunk) is missing or cut short")
    width, height = struct.unpack_from(">II", data, 16)
    return height, width


def _png_significant_bits(data: bytes) -> int | None:
    """The largest significant-bit count of the colour channels in the ``sBIT`` chunk, or None.

    ``sBIT`` precedes the image data, so only the chunks before the first IDAT are walked.
    """
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT" or kind == b"IEND":
            return None
        if kind == b"sBIT":
            body = data[pos + 8 : pos + 8 + length]
            color_type = data[25] if len(data) > 25 else 0
            # Gray (0) and gray+alpha (4) give the gray channel first; RGB (2), palette (3) and
            # RGBA (6) give R, G, B first; a trailing alpha byte is not about the image.
            channels = body[:1] if color_type in (0, 4) else body[:3]
            bits = max(channels, default=0)
            return int(bits) if 0 < bits <= 16 else None
        pos += 12 + length
    return None


def _png16_scale(data: bytes, peak: int, notes: list[str]) -> float:
    """The divisor that maps a 16-bit PNG onto [0, 1] (see the module docstring)."""
    sbit = _png_significant_bits(data)
    if sbit is not None and sbit < 16:
        if peak < 2**sbit:
            notes.append(f"16-bit PNG with {sbit} significant bits (sBIT): scaled by {2**sbit - 1}")
            return float(2**sbit - 1)
        # The samples were scaled up to 16 bits, as the PNG standard asks of an encoder.
        return 65535.0
    if sbit is None and 0 < peak < 2**15:
        bits = max(int(peak).bit_length(), 8)
        notes.append(
            f"16-bit PNG without an sBIT chunk whose highest set bit is bit {bits}: taken as {bits}-bit data and "
            f"scaled by {2**bits - 1}, not 65535"
        )
        return float(2**bits - 1)
    return 65535.0


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk the marker segments to the first SOFn frame header (height, width are big endian).
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise UnusableImageError(
                "decode_error", f"JPEG marker structure is corrupt at byte {pos}"
            )
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            pos += 2
            continue
        (seg_len,) = struct.unpack_from(">H", data, pos + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return height, width
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + seg_len
    raise UnusableImageError(
        "truncated", "JPEG frame header (SOF) not found; the file is cut short or corrupt"
    )


def _read_raster(data: bytes, fmt: str) -> tuple[np.ndarray, ImageInfo]:
    import cv2

    notes: list[str] = []
    if fmt == "png":
        height, width = _png_size(data)
        # Every complete PNG has the IEND chunk (its type and CRC are constant bytes); libpng
        # may decode a cut file partially. Searched, not read at the end: some tools append
        # data after IEND.
        if data.rfind(b"IEND\xaeB`\x82") == -1:
            raise UnusableImageError(
                "truncated", "PNG has no IEND chunk: the file is cut short; re-export it"
            )
    else:
        height, width = _jpeg_size(data)
        # libjpeg fills a cut JPEG with gray and only warns, so check the EOI marker ourselves.
        # Entropy-coded data never contains 0xFFD9 (0xFF is always stuffed), so finding it near
        # the end is safe; near, because some writers append bytes after EOI.
        if b"\xff\xd9" not in data[-4096:]:
            raise UnusableImageError(
                "truncated", "JPEG has no end-of-image marker: the file is cut short; re-export it"
            )
    _check_size(height, width)

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise UnusableImageError(
            "decode_error", f"{fmt.upper()} data is corrupt: the decoder rejected it"
        )
    if arr.dtype not in (np.uint8, np.uint16):
        raise UnusableImageError(
            "decode_error",
            f"{fmt.upper()} sample type {arr.dtype} is not supported; use 8- or 16-bit",
        )
    scale = float(np.iinfo(arr.dtype).max)
    if arr.ndim == 2:
        photometric = "GRAY"
        gray = arr.astype(np.float64)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        photometric = "RGB" if arr.shape[2] == 3 else "RGBA"
        if arr.shape[2] == 4:
            notes.append("alpha channel dropped")
        # OpenCV returns BGR(A).
        gray = _luma(arr[..., 2::-1][..., :3])
        notes.append(f"{photometric} converted to gray (BT.601 luma)")
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):
        photometric = "GRAY" if arr.shape[2] == 1 else "GRAYA"
        gray = arr[..., 0].astype(np.float64)
    else:
        raise UnusableImageError(
            "decode_error", f"{fmt.upper()} decoded to unexpected shape {arr.shape}"
        )

    if arr.dtype == np.uint16 and fmt == "png":
        color = arr[..., :3] if arr.ndim == 3 and arr.shape[2] >= 3 else (arr[..., :1] if arr.ndim == 3 else arr)
        scale = _png16_scale(data, int(color.max()), notes)
    out = _finish(gray / scale)
    info = ImageInfo(
        format=fmt, height=out.shape[0], width=out.shape[1], photometric=photometric, notes=notes
    )
    return out, info


# --------------------------------------------------------------------------------------
# DICOM


def _read_dicom(data: bytes, scope: ScopePolicy | None = None) -> tuple[np.ndarray, ImageInfo]:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        # Parser warnings can quote element values (identifiers), so they are kept from the
        # log; only "end of file" is used, as evidence of a cut file. (catch_warnings is
        # process-global: reader threads may briefly share filters; the pixels are unaffected.)
        warnings.simplefilter("always")
        try:
            ds = dcmread(io.BytesIO(data), force=not has_preamble)
        except (InvalidDicomError, EOFError) as exc:
            raise UnusableImageError(
                "truncated",
                f"DICOM header ends early or is malformed ({_short(exc)}); re-export the file",
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise UnusableImageError(
                "decode_error",
                f"DICOM header could not be parsed ({type(exc).__name__}: {_short(exc)})",
            ) from exc
    hit_eof = any("end of file" in str(w.message).lower() for w in caught)

    if "PixelData" not in ds:
        _raise_without_pixels(ds, has_preamble, hit_eof)

    _check_modality(ds, notes)
    if scope is not None:
        # Before any pixel check: a hip film is out of scope whether or not it is intact.
        from agcnn.data.scope import decide

        decision = decide(ds, scope)
        if decision.reason:
            raise UnusableImageError(decision.reason, decision.message)
        notes.extend(decision.notes)

    if hit_eof:
        raise UnusableImageError(
            "truncated",
            "file ends inside the encapsulated Pixel Data: it was cut short; re-export it",
        )

    _ensure_transfer_syntax(ds, notes)
    rows, cols, frames = _check_pixel_module(ds, notes)
    _check_size(rows, cols)
    _check_native_length(ds, rows, cols, frames)

    _check_codestream_end(ds, frames)
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        # Raw detector data, before the vendor's processing: it looks unlike the displayed
        # radiographs a chest model is trained on.
        notes.append("FOR PROCESSING image (raw detector data, not meant for display)")

    photometric_found = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    frame = _decode_first_frame(ds, frames, notes)

    if photometric_found in ("MONOCHROME1", "MONOCHROME2"):
        if frame.ndim != 2:
            raise UnusableImageError(
                "decode_error",
                f"{photometric_found} frame decoded to shape {frame.shape}, expected 2-D",
            )
        y = _grayscale_to_unit(frame, ds, notes)
        if photometric_found == "MONOCHROME1":
            # MONOCHROME1 files carry Presentation LUT Shape INVERSE as a matter of course
            # (PS3.3 C.8.11.4 for DX): it states the same inversion, so it is not applied twice.
            y = 1.0 - y
            notes.append("MONOCHROME1 inverted")
        elif str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
            # PS3.3 C.11.6: INVERSE maps the VOI output v to max - v before display, so the
            # image as seen (and as a chest model was trained on) is the inverted one.
            y = 1.0 - y
            notes.append("Presentation LUT Shape INVERSE applied: inverted")
    else:
        y = _color_to_unit(frame, ds, photometric_found, notes)

    out = _finish(y)
    info = ImageInfo(
        format="dicom",
        height=out.shape[0],
        width=out.shape[1],
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        photometric=photometric_found or None,
        notes=notes,
        header=_without_pixels(ds),
    )
    return out, info


def _without_pixels(ds: Any) -> Any:
    """A new Dataset with the elements of ``ds`` before the pixel data, and its file meta.

    What later steps need from the header (the DICOM results copy it), without a second parse
    and without carrying the pixel bytes between processes.
    """
    from pydicom.dataset import Dataset

    header = Dataset()
    for tag in list(ds.keys()):
        if tag < 0x7FE00000:
            header[tag] = ds.get_item(tag)  # as read: a raw element is converted only when used
    header.file_meta = ds.file_meta
    header.set_original_encoding(ds.is_little_endian, ds.is_implicit_VR, ds.original_character_set)
    return header


def _uid(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def _sop_class(ds: Any) -> Any:
    sop = ds.get("SOPClassUID")
    if not sop and hasattr(ds, "file_meta"):
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
    return sop


def _raise_without_pixels(ds: Any, has_preamble: bool, hit_eof: bool) -> None:
    for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            raise UnusableImageError(
                "decode_error",
                f"{keyword} (a parametric map) is not supported; only integer Pixel Data is",
            )
    sop = _sop_class(ds)
    sop_name = getattr(sop, "name", None) or (str(sop) if sop else "")
    # A cut file still parses: pydicom returns whatever elements came before the cut. An image
    # header (an image SOP class, Rows/Columns) without Pixel Data is therefore a cut file,
    # while SR, presentation states, KOS and DICOMDIR never had pixels.
    looks_like_image = "Image Storage" in sop_name or "Rows" in ds or "Columns" in ds
    meta_incomplete = has_preamble and "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    if hit_eof or looks_like_image or meta_incomplete or not sop_name:
        # A CT or MR slice would be rejected even if whole: report what matters for the batch
        # (skip it) rather than a damage the user need not chase.
        _check_modality(ds, [])
        what = f"the header ({sop_name})" if sop_name else "the header"
        raise UnusableImageError(
            "truncated",
            f"{what} has no Pixel Data: the file is cut short (it ends inside the header); "
            "re-export it",
        )
    raise UnusableImageError(
        "no_pixel_data",
        f"no Pixel Data: {sop_name} is not an image (structured reports, presentation "
        "states, key-object selections and DICOMDIRs carry none); skip it",
    )


def _check_modality(ds: Any, notes: list[str]) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in _ASSUMED_RADIOGRAPH_MODALITIES:
        notes.append(
            f"Modality {modality or 'absent'}: assumed to be a secondary capture of a radiograph"
        )
    elif modality not in RADIOGRAPH_MODALITIES:
        raise UnusableImageError(
            "unsupported_modality",
            f"Modality {modality!r} is not a projection radiograph; accepted: "
            f"{', '.join(sorted(RADIOGRAPH_MODALITIES))} (and OT or none, as secondary captures)",
        )


def _ensure_transfer_syntax(ds: Any, notes: list[str]) -> None:
    """Give preamble-less / meta-less files the transfer syntax they were parsed with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        if not ts.is_transfer_syntax:
            raise UnusableImageError(
                "decode_error",
                f"Transfer Syntax UID {str(ts)!r} is not a known (public) transfer syntax; "
                "re-export the file with a standard one",
            )
        return
    if ds["PixelData"].is_undefined_length:
        raise UnusableImageError(
            "decode_error",
            "compressed (encapsulated) Pixel Data without a Transfer Syntax UID: the codec is unknown; "
            "re-export the file with its file meta information",
        )
    implicit, little = ds.original_encoding
    ts = (
        ImplicitVRLittleEndian
        if implicit
        else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    ds.file_meta.TransferSyntaxUID = ts
    notes.append(f"no Transfer Syntax UID in file: {ts.name} inferred from the encoding")


def _check_pixel_module(ds: Any, notes: list[str]) -> tuple[int, int, int]:
    missing = [
        k
        for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
        if ds.get(k) in (None, "")
    ]
    if missing:
        raise UnusableImageError(
            "truncated",
            f"Pixel Data present but required tag(s) {', '.join(missing)} missing: the header is "
            "incomplete; re-export the file",
        )
    rows, cols, bits_allocated = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if bits_allocated not in (1, 8, 16, 32):
        raise UnusableImageError(
            "decode_error", f"BitsAllocated={bits_allocated} is not supported; valid: 1, 8, 16, 32"
        )
    # Repairs for old files that omit type-1 tags whose value is implied by the others.
    if ds.get("SamplesPerPixel") is None:
        ds.SamplesPerPixel = (
            1 if photometric.startswith("MONOCHROME") or photometric == "PALETTE COLOR" else 3
        )
        notes.append(f"SamplesPerPixel missing: {ds.SamplesPerPixel} assumed from {photometric}")
    if ds.get("PixelRepresentation") is None:
        ds.PixelRepresentation = 0
        notes.append("PixelRepresentation missing: unsigned assumed")
    if ds.get("BitsStored") is None:
        ds.BitsStored = bits_allocated
        notes.append(f"BitsStored missing: {bits_allocated} (BitsAllocated) assumed")
    if not 0 < int(ds.BitsStored) <= bits_allocated:
        raise UnusableImageError(
            "decode_error",
            f"BitsStored={ds.BitsStored} is impossible with BitsAllocated={bits_allocated}; "
            "the header is corrupt",
        )
    if ds.get("HighBit") is None:
        ds.HighBit = int(ds.BitsStored) - 1
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
        notes.append("NumberOfFrames unreadable: 1 assumed")
    return rows, cols, max(frames, 1)


def _check_native_length(ds: Any, rows: int, cols: int, frames: int) -> None:
    from pydicom.pixels.utils import get_expected_length

    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = get_expected_length(ds, "bytes")
    actual = len(ds.PixelData)
    if actual < expected:
        raise UnusableImageError(
            "truncated",
            f"Pixel Data has {actual} bytes but {rows}x{cols} px x {ds.SamplesPerPixel} sample(s) x "
            f"{frames} frame(s) at {ds.BitsAllocated} bits needs {expected}: the file is cut short; "
            "re-export it",
        )


def _decode_first_frame(ds: Any, frames: int, notes: list[str]) -> np.ndarray:
    from pydicom.pixels import pixel_array

    ts = ds.file_meta.TransferSyntaxUID
    try:
        # index=0 decodes only the first frame, so a long multi-frame object costs one frame.
        # raw=False: pydicom converts YBR_FULL / YBR_FULL_422 to RGB and masks unused high bits.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0, raw=False, decoding_plugin=_decoding_plugin(ts))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 — see below
        # Any codec failure is the file's problem. BaseException because pylibjpeg-rle
        # reports some corrupt streams as a Rust panic (pyo3 PanicException), which does
        # not derive from Exception.
        arr = _decode_jpeg12_with_gdcm(ds, frames)
        if arr is not None:
            notes.append("12-bit JPEG Extended decoded with GDCM directly")
            if frames > 1:
                notes.append(f"multi-frame ({frames} frames): first frame used")
            return arr
        hint = (
            "the data is corrupt, or the codec is missing (JPEG 2000: pylibjpeg-openjpeg; "
            "JPEG, JPEG-LS: python-gdcm; RLE: pylibjpeg-rle)"
            if ts.is_compressed
            else "the pixel description in the header is inconsistent"
        )
        raise UnusableImageError(
            "decode_error", f"{ts.name} pixel data could not be decoded: {hint} ({_short(exc, ds)})"
        ) from exc
    if frames > 1:
        notes.append(f"multi-frame ({frames} frames): first frame used")
    return arr


def _check_codestream_end(ds: Any, frames: int) -> None:
    """A JPEG / JPEG-LS / JPEG 2000 frame must end with its EOI/EOC marker (both 0xFFD9).

    libjpeg and openjpeg decode a cut codestream without complaint, filling the missing part
    with gray, so a cut file would silently become a wrong image. Encoders may pad the frame
    with a 0x00 or 0xFF byte to an even length, hence the look at the last four bytes.
    """
    from pydicom.encaps import get_frame
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    ts = ds.file_meta.TransferSyntaxUID
    if ts not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return
    try:
        codestream = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:  # noqa: BLE001 — a broken fragment structure is the decoder's to report
        return
    if b"\xff\xd9" not in codestream.rstrip(b"\x00")[-4:]:
        raise UnusableImageError(
            "truncated",
            f"the {ts.name} codestream of the first frame has no end marker (0xFFD9): the "
            "pixel data is cut short; re-export the file",
        )


def _decoding_plugin(ts: Any) -> str:
    """The pydicom decoding plugin to force for `ts`, or "" for pydicom's default order.

    pydicom tries its plugins in turn, GDCM first for JPEG 2000. On a corrupt JPEG 2000
    codestream GDCM can abort the whole process (an uncaught C++ exception: a batch of
    10,000 files dies on one bad file), while pylibjpeg-openjpeg raises an ordinary error. For
    RLE, pydicom's own decoder returns garbage for some corrupt streams without raising, while
    pylibjpeg-rle detects them. So both go to pylibjpeg alone when it is installed.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000TransferSyntaxes, RLELossless

    if ts != RLELossless and ts not in JPEG2000TransferSyntaxes:
        return ""
    try:
        available = get_decoder(ts).available_plugins
    except Exception:  # noqa: BLE001 — no decoder at all: let pixel_array say so
        return ""
    return "pylibjpeg" if "pylibjpeg" in available else ""


def _decode_jpeg12_with_gdcm(ds: Any, frames: int) -> np.ndarray | None:
    """First frame of 12-bit grayscale JPEG Extended, or None when that is not the case.

    pydicom's GDCM plugin refuses 12-bit JPEG Extended (1.2.840.10008.1.2.4.51), and its other
    decoder for it (pylibjpeg-libjpeg) is GPL-licensed and not a dependency. GDCM itself decodes
    it correctly (python-gdcm 3.2.6, checked against DCMTK by tfmoraes/python-gdcm#35), and this
    is the classic lossy format of older CR archives, so it gets this direct route.
    """
    from pydicom.encaps import get_frame
    from pydicom.uid import JPEGExtended12Bit

    if ds.file_meta.TransferSyntaxUID != JPEGExtended12Bit or int(ds.SamplesPerPixel) != 1:
        return None
    bits_stored = int(ds.BitsStored)
    if not 8 < bits_stored <= 12:
        return None
    try:
        import gdcm
    except ImportError:
        return None
    rows, cols, signed = int(ds.Rows), int(ds.Columns), int(ds.PixelRepresentation) == 1
    try:
        codestream = get_frame(ds.PixelData, 0, number_of_frames=frames)
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(codestream)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        element.SetValue(fragments.__ref__())
        image = gdcm.Image()
        image.SetNumberOfDimensions(2)
        image.SetDimensions((cols, rows, 1))
        image.SetDataElement(element)
        pi = str(ds.PhotometricInterpretation).strip()
        image.SetPhotometricInterpretation(
            gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.GetPIType(pi))
        )
        image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
        image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, int(signed)))
        # GDCM hands back char* as str; surrogateescape recovers the bytes (as pydicom does).
        raw = image.GetBuffer().encode("utf-8", "surrogateescape")
    except Exception:  # noqa: BLE001 — fall through to the caller's decode_error
        return None
    if len(raw) < rows * cols * 2:
        return None
    arr = np.frombuffer(raw, dtype="<u2", count=rows * cols).reshape(rows, cols)
    arr = arr & np.uint16(2**bits_stored - 1)
    if signed:
        # Sign-extend the stored bits, as pydicom does for native data.
        arr = arr.astype(np.int32)
        arr = np.where(arr >= 2 ** (bits_stored - 1), arr - 2**bits_stored, arr).astype(np.int16)
    return arr


def _as_floats(value: Any) -> list[float]:
    from pydicom.multival import MultiValue

    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [float(v) for v in items]


def _grayscale_to_unit(frame: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    x: np.ndarray = frame
    if "ModalityLUTSequence" in ds:
        x = apply_modality_lut(frame, ds)
        notes.append("Modality LUT applied")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            x = frame.astype(np.float64) * slope + intercept
            notes.append(f"rescale applied (slope {slope:g}, intercept {intercept:g})")
    x = x.astype(np.float64, copy=False)

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        y = _apply_voi_lut_sequence(x, ds, notes)
        if y is not None:
            return y
    if "WindowCenter" in ds and "WindowWidth" in ds:
        y = _apply_window(x, ds, notes)
        if y is not None:
            return y
    else:
        notes.append("no VOI LUT or window in file: min-max scaled")
    return _min_max(x, notes)


def _min_max(x: np.ndarray, notes: list[str]) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        notes.append("constant image: all zeros")
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _apply_voi_lut_sequence(x: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray | None:
    from pydicom.pixels import apply_voi

    n_luts = len(ds.VOILUTSequence)
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        n_entries = descriptor[0] or 65536  # PS3.3 C.11.2.1.1: 0 means 2**16 entries
        first = descriptor[1]
        if first >= 32768 and ds.get("PixelRepresentation", 0) == 1:
            first -= 65536  # first mapped value stored as US although the data is signed
        # Integer input: pydicom indexes the LUT with it (and wraps beyond uint16), so clip
        # to the LUT's input range first; outside it the end entries apply anyway.
        xi = np.clip(np.rint(x), first, first + n_entries - 1).astype(np.int64)
        table = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds, index=0).astype(
            np.float64
        )
        lo, hi = float(table.min()), float(table.max())
        if hi <= lo:
            notes.append("VOI LUT is constant: ignored")
            return None
        y = (apply_voi(xi, ds, index=0).astype(np.float64) - lo) / (hi - lo)
    except Exception as exc:  # noqa: BLE001 — a broken LUT should not cost the image
        notes.append(f"VOI LUT unusable ({type(exc).__name__}): ignored")
        return None
    notes.append("VOI LUT applied" if n_luts == 1 else f"VOI LUT 1 of {n_luts} applied")
    return y


def _apply_window(x: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray | None:
    try:
        centers, widths = _as_floats(ds.WindowCenter), _as_floats(ds.WindowWidth)
        c, w = centers[0], widths[0]
    except (TypeError, ValueError, IndexError):
        notes.append("Window Center/Width unreadable: min-max scaled")
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    n = max(len(centers), len(widths))
    # PS3.3 C.11.2.1.2: width >= 1 for LINEAR, > 0 for LINEAR_EXACT and SIGMOID.
    if function == "LINEAR" and w >= 1:
        if w == 1:
            y = (x > c - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    elif function == "LINEAR_EXACT" and w > 0:
        y = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    elif function == "SIGMOID" and w > 0:
        y = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700, 700)))
    else:
        notes.append(f"window unusable (function {function}, width {w:g}): min-max scaled")
        return None
    which = "window" if n == 1 else f"window 1 of {n}"
    notes.append(f"{which} used (center {c:g}, width {w:g}, {function})")
    return y


def _color_to_unit(frame: np.ndarray, ds: Any, photometric: str, notes: list[str]) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(frame, ds)
        scale = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind == "u" else float(rgb.max() or 1)
        notes.append("PALETTE COLOR converted to gray (BT.601 luma)")
        return _luma(rgb) / scale
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise UnusableImageError(
            "decode_error",
            f"PhotometricInterpretation {photometric!r} with a frame of shape {frame.shape} is not "
            "supported; expected MONOCHROME1/2, RGB, YBR_* or PALETTE COLOR",
        )
    # pixel_array(raw=False) has already turned YBR_FULL(_422) into RGB; JPEG 2000 YBR_ICT/RCT
    # come out of the codec as RGB.
    bits = int(ds.BitsStored)
    notes.append(f"{photometric} converted to gray (BT.601 luma)")
    return _luma(frame) / float(2**bits - 1)
