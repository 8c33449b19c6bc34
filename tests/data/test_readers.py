"""Golden-pixel tests for agcnn.data.readers on small files written into tmp_path.

Expected values are either hand-computed (windows, LUTs, inversion) or the reader's output on
the same pixels stored uncompressed (for every transfer syntax). Real chest CR files come from
pydicom-data (RG1_*) and are skipped when it is not installed.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from agcnn.data.dicom_write import encodable_transfer_syntaxes, write_dicom
from agcnn.data.readers import (
    REASONS,
    ImageInfo,
    UnusableImageError,
    read_image,
    read_image_with_info,
    sniff_format,
)

H, W = 40, 48
ENCODABLE = set(encodable_transfer_syntaxes())


def _pattern(high: int = 4095, shape=(H, W), seed: int = 0) -> np.ndarray:
    """A deterministic uint16 image that uses the full range 0..high."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, high + 1, shape).astype(np.uint16)
    a.flat[0], a.flat[1] = 0, high
    return a


def _write(tmp_path, name: str, pixels, **kw) -> str:
    path = str(tmp_path / name)
    write_dicom(path, pixels, **kw)
    return path


def _min_max(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min())


def _luma(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _check_contract(out: np.ndarray, shape=(H, W)) -> None:
    assert out.dtype == np.float32
    assert out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def _expect_unusable(path, reason: str) -> UnusableImageError:
    with pytest.raises(UnusableImageError) as excinfo:
        read_image(path)
    assert excinfo.value.reason == reason, str(excinfo.value)
    assert str(excinfo.value)  # a human message is always there
    return excinfo.value


# --------------------------------------------------------------------------------------
# DICOM grayscale pipeline: modality LUT -> VOI -> MONOCHROME1 -> [0, 1]


def test_monochrome2_rescale_and_window_golden(tmp_path):
    # 32x32 tiles of four stored values; modality values x = 2*s - 1000.
    stored = np.repeat(np.array([0, 1000, 2000, 3000], dtype=np.uint16), 32 * 8).reshape(32, 32)
    path = _write(
        tmp_path,
        "win.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=2000.5,
        WindowWidth=4001,
    )
    out, info = read_image_with_info(path)
    _check_contract(out, (32, 32))
    # LINEAR window (PS3.3 C.11.2.1.2): y = (x - (c - 0.5)) / (w - 1) + 0.5, clipped.
    # x = -1000, 1000, 3000, 5000 -> -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1.
    np.testing.assert_allclose(np.unique(out), [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    assert out[0, 0] == 0.0 and out[-1, -1] == 1.0
    assert info.format == "dicom" and info.photometric == "MONOCHROME2"
    assert (info.height, info.width) == (32, 32)
    assert info.sop_instance_uid and info.series_instance_uid and info.study_instance_uid
    assert any("rescale applied" in n for n in info.notes)


def test_rescale_without_voi_is_min_max_of_modality_values(tmp_path):
    a = _pattern()
    out, info = read_image_with_info(
        _write(tmp_path, "mm.dcm", a, RescaleSlope=0.5, RescaleIntercept=-1024)
    )
    np.testing.assert_allclose(out, _min_max(a * 0.5 - 1024), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert any("min-max" in n for n in info.notes)


def test_signed_pixels(tmp_path):
    a = (_pattern().astype(np.int32) - 2048).astype(np.int16)
    out = read_image(_write(tmp_path, "signed.dcm", a))
    np.testing.assert_allclose(out, _min_max(a), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    stored = np.repeat(np.array([0, 1000, 2000, 3000], dtype=np.uint16), 32 * 8).reshape(32, 32)
    out, info = read_image_with_info(_write(tmp_path, "m1.dcm", stored, photometric="MONOCHROME1"))
    # Low stored value = dense = bright after reading.
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-6)
    assert out[0, 0] == 1.0 and out[-1, -1] == 0.0
    assert "MONOCHROME1 inverted" in info.notes


def test_monochrome1_with_window_inverts_after_the_window(tmp_path):
    stored = np.repeat(np.array([0, 1000, 2000, 3000], dtype=np.uint16), 32 * 8).reshape(32, 32)
    path = _write(
        tmp_path,
        "m1w.dcm",
        stored,
        photometric="MONOCHROME1",
        WindowCenter=1500.5,
        WindowWidth=2001,
    )
    out = read_image(path)
    # window: (x - 1500) / 2000 + 0.5 -> 0, 0.25, 0.75, 1 ; inverted -> 1, 0.75, 0.25, 0
    np.testing.assert_allclose(out[0, 0], 1.0)
    np.testing.assert_allclose(out[-1, -1], 0.0)
    np.testing.assert_allclose(np.unique(out), [0.0, 0.25, 0.75, 1.0], atol=1e-7)


def test_monochrome1_equals_inverted_monochrome2(tmp_path):
    a = _pattern()
    m2 = read_image(_write(tmp_path, "m2.dcm", a))
    m1 = read_image(
        _write(tmp_path, "m1.dcm", (4095 - a).astype(np.uint16), photometric="MONOCHROME1")
    )
    np.testing.assert_allclose(m1, m2, atol=1e-6)


def test_first_of_several_windows_is_used(tmp_path):
    a = _pattern()
    path = _write(
        tmp_path, "w3.dcm", a, WindowCenter=[1000, 3000, 2000], WindowWidth=[500, 100, 4000]
    )
    out, info = read_image_with_info(path)
    expected = np.clip((a - 999.5) / 499 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert any(n.startswith("window 1 of 3 used") for n in info.notes), info.notes


@pytest.mark.parametrize(
    "function, expected",
    [
        ("LINEAR_EXACT", lambda x: np.clip((x - 2000) / 1000 + 0.5, 0, 1)),
        ("SIGMOID", lambda x: 1 / (1 + np.exp(-4 * (x - 2000) / 1000))),
    ],
)
def test_voi_lut_function(tmp_path, function, expected):
    a = _pattern()
    path = _write(
        tmp_path, "f.dcm", a, WindowCenter=2000, WindowWidth=1000, VOILUTFunction=function
    )
    np.testing.assert_allclose(read_image(path), expected(a.astype(np.float64)), atol=1e-6)


def _voi_lut_item(lut: np.ndarray, first: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, bits]
    item.LUTData = [int(v) for v in lut]
    item["LUTData"].VR = "US"
    item.LUTExplanation = "test"
    return item


def test_voi_lut_sequence_is_applied_and_preferred_over_window(tmp_path):
    a = _pattern()
    # A non-linear LUT over 0..4095 whose output only reaches 255 though it declares 16 bits
    # (a common quirk): the output range of the LUT itself maps onto [0, 1].
    lut = np.round(255 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    second = _voi_lut_item(np.arange(4096, dtype=np.uint16), 0, 16)
    path = _write(
        tmp_path,
        "voilut.dcm",
        a,
        VOILUTSequence=Sequence([_voi_lut_item(lut, 0, 16), second]),
        WindowCenter=100,
        WindowWidth=10,
    )
    out, info = read_image_with_info(path)
    np.testing.assert_allclose(out, lut[a] / 255.0, atol=1e-6)
    assert any("VOI LUT 1 of 2" in n for n in info.notes), info.notes


def test_voi_lut_clamps_values_outside_its_input_range(tmp_path):
    a = _pattern()
    lut = np.arange(100, 1100, dtype=np.uint16)  # maps input 1000..1999
    out = read_image(
        _write(tmp_path, "clamp.dcm", a, VOILUTSequence=Sequence([_voi_lut_item(lut, 1000, 16)]))
    )
    expected = (lut[np.clip(a.astype(int), 1000, 1999) - 1000] - 100) / 999.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_bits_stored_masks_garbage_in_high_bits(tmp_path):
    a = _pattern()
    garbage = (a | np.uint16(0xA000)).astype(np.uint16)  # bits 13 and 15 set, outside BitsStored=12
    out_garbage = read_image(_write(tmp_path, "g.dcm", garbage, BitsStored=12))
    out_clean = read_image(_write(tmp_path, "c.dcm", a, BitsStored=12))
    np.testing.assert_array_equal(out_garbage, out_clean)
    np.testing.assert_allclose(out_clean, _min_max(a), atol=1e-6)


def test_for_processing_image_is_read_with_a_note(tmp_path):
    path = _write(tmp_path, "raw.dcm", _pattern(), PresentationIntentType="FOR PROCESSING")
    _, info = read_image_with_info(path)
    assert any("FOR PROCESSING" in n for n in info.notes)


def test_presentation_lut_shape_inverse_inverts_monochrome2(tmp_path):
    # PS3.3 C.11.6: INVERSE on MONOCHROME2 means the image is displayed inverted.
    a = _pattern()
    plain = read_image(_write(tmp_path, "id.dcm", a, modality="CR", PresentationLUTShape="IDENTITY"))
    inv, info = read_image_with_info(_write(tmp_path, "inv.dcm", a, modality="CR", PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(inv, 1.0 - plain, atol=1e-6)
    assert "Presentation LUT Shape INVERSE applied: inverted" in info.notes
    # MONOCHROME1 with INVERSE (its usual companion) is inverted once, not twice.
    m1 = read_image(_write(tmp_path, "m1.dcm", a, photometric="MONOCHROME1", modality="CR"))
    np.testing.assert_allclose(m1, 1.0 - plain, atol=1e-6)


def test_constant_image_gives_zeros_with_a_note(tmp_path):
    out, info = read_image_with_info(_write(tmp_path, "flat.dcm", np.full((H, W), 7, np.uint16)))
    assert not out.any()
    assert "constant image: all zeros" in info.notes


def test_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([_pattern(seed=s) for s in range(3)])
    out, info = read_image_with_info(_write(tmp_path, "mf.dcm", frames))
    np.testing.assert_allclose(out, _min_max(frames[0]), atol=1e-6)
    assert "multi-frame (3 frames): first frame used" in info.notes


def test_multiframe_compressed_uses_first_frame(tmp_path):
    frames = np.stack([_pattern(seed=s) for s in range(3)])
    out = read_image(_write(tmp_path, "mf_rle.dcm", frames, transfer_syntax=uid.RLELossless))
    np.testing.assert_allclose(out, _min_max(frames[0]), atol=1e-6)


# --------------------------------------------------------------------------------------
# colour DICOM


def test_rgb_to_luma(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (H, W, 3)).astype(np.uint8)
    out, info = read_image_with_info(_write(tmp_path, "rgb.dcm", rgb, photometric="RGB"))
    np.testing.assert_allclose(out, _luma(rgb) / 255.0, atol=1e-6)
    assert info.photometric == "RGB"
    assert any("converted to gray" in n for n in info.notes)


def test_ybr_full_to_luma(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out, info = read_image_with_info(_write(tmp_path, "ybr.dcm", ybr, photometric="YBR_FULL"))
    # YBR->RGB round trip is exact to 1 grey level.
    np.testing.assert_allclose(out, _luma(rgb) / 255.0, atol=1.5 / 255)
    assert info.photometric == "YBR_FULL"


# --------------------------------------------------------------------------------------
# transfer syntaxes: every encoding of the same pixels reads back the same


LOSSLESS = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEG2000Lossless,
    uid.JPEGLSLossless,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
]


@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda t: t.name)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossless_transfer_syntaxes_match_uncompressed(tmp_path, ts, photometric):
    if ts not in ENCODABLE:
        pytest.skip(f"{ts.name} cannot be encoded here (no encoder plugin)")
    a = _pattern()
    ref = read_image(_write(tmp_path, "ref.dcm", a, photometric=photometric, BitsStored=12))
    path = _write(
        tmp_path, "enc.dcm", a, photometric=photometric, BitsStored=12, transfer_syntax=ts
    )
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(read_image(path), ref)


def test_rgb_lossless_compressed_matches_uncompressed(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3)).astype(np.uint8)
    ref = read_image(_write(tmp_path, "ref.dcm", rgb, photometric="RGB"))
    for ts in (uid.RLELossless, uid.JPEG2000Lossless):
        np.testing.assert_array_equal(
            read_image(_write(tmp_path, "c.dcm", rgb, photometric="RGB", transfer_syntax=ts)), ref
        )


@pytest.mark.parametrize(
    "ts, dtype, tol",
    [
        (uid.JPEGBaseline8Bit, np.uint8, 3 / 255),
        (uid.JPEGExtended12Bit, np.uint16, 3 / 4095),  # 12-bit: decoded through GDCM directly
        (uid.JPEG2000, np.uint16, 0.05),
    ],
    ids=["jpeg-baseline-8bit", "jpeg-extended-12bit", "jpeg2000-lossy"],
)
def test_lossy_transfer_syntaxes_are_close(tmp_path, ts, dtype, tol):
    if ts not in ENCODABLE:
        pytest.skip(f"{ts.name} cannot be encoded here")
    # A smooth image: lossy codecs are meant for those, noise would dominate the error.
    yy, xx = np.mgrid[0:64, 0:64]
    high = 255 if dtype == np.uint8 else 4095
    a = np.round(high * (0.5 + 0.25 * np.sin(xx / 9) + 0.2 * np.cos(yy / 7))).astype(dtype)
    extra = {} if dtype == np.uint8 else {"BitsStored": 12}
    ref = read_image(_write(tmp_path, "ref.dcm", a, **extra))
    out = read_image(_write(tmp_path, "lossy.dcm", a, transfer_syntax=ts, **extra))
    _check_contract(out, (64, 64))
    assert np.abs(out - ref).mean() < tol


def _strip_preamble(src: str, dst: str) -> None:
    data = open(src, "rb").read()
    assert data[128:132] == b"DICM"
    open(dst, "wb").write(data[132:])


def test_preambleless_with_file_meta(tmp_path):
    a = _pattern()
    src = _write(tmp_path, "with.dcm", a)
    dst = str(tmp_path / "IM0001")
    _strip_preamble(src, dst)
    assert sniff_format(dst) == "dicom"
    np.testing.assert_array_equal(read_image(dst), read_image(src))


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_preambleless_without_file_meta(tmp_path, implicit):
    a = _pattern()
    src = _write(tmp_path, "with.dcm", a)
    ds = pydicom.dcmread(src)
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
    data = buf.getvalue()
    assert data[:2] == b"\x08\x00"  # starts directly with a group 0x0008 element
    dst = tmp_path / "raw"
    dst.write_bytes(data)
    assert sniff_format(dst) == "dicom"
    out, info = read_image_with_info(dst)
    np.testing.assert_array_equal(out, read_image(src))
    assert any("inferred" in n for n in info.notes)


# --------------------------------------------------------------------------------------
# PNG / JPEG


def _imwrite(path, arr) -> str:
    import cv2

    assert cv2.imwrite(str(path), arr)
    return str(path)


def test_png_8bit_gray(tmp_path):
    a = (_pattern() // 16).astype(np.uint8)
    out, info = read_image_with_info(_imwrite(tmp_path / "g8.png", a))
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)
    assert (info.format, info.photometric, info.height, info.width) == ("png", "GRAY", H, W)
    assert info.sop_instance_uid is None


def test_png_16bit_gray(tmp_path):
    a = (_pattern() * 16).astype(np.uint16)
    out, info = read_image_with_info(_imwrite(tmp_path / "g16.png", a))
    np.testing.assert_allclose(out, a / 65535.0, atol=1e-7)
    assert not any("12 bits" in n for n in info.notes)


def _with_sbit(path, bits: int):
    """Insert an sBIT chunk (gray: one byte) right after the IHDR chunk of a PNG file."""
    import struct
    import zlib
    from pathlib import Path

    path = Path(path)
    data = path.read_bytes()
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
    path.write_bytes(data[:33] + chunk + data[33:])
    return path


def test_png_16bit_holding_12bit_data_is_scaled_by_its_highest_bit(tmp_path):
    a = _pattern()
    assert int(a.max()).bit_length() == 12
    out, info = read_image_with_info(_imwrite(tmp_path / "g12.png", a))
    np.testing.assert_allclose(out, a / 4095.0, atol=1e-7)
    assert any("without an sBIT chunk whose highest set bit is bit 12" in n and "4095" in n for n in info.notes)


def test_png_16bit_scaled_by_its_sbit_chunk(tmp_path):
    a = (_pattern() // 2).astype(np.uint16)  # 11 bits used, 12 declared
    out, info = read_image_with_info(_with_sbit(_imwrite(tmp_path / "s12.png", a), 12))
    np.testing.assert_allclose(out, a / 4095.0, atol=1e-7)
    assert any("12 significant bits (sBIT)" in n for n in info.notes)
    # Samples scaled up to 16 bits, as the PNG standard asks: sBIT only says the low bits are filler.
    shifted = (_pattern() * 16).astype(np.uint16)
    out = read_image(_with_sbit(_imwrite(tmp_path / "s12up.png", shifted), 12))
    np.testing.assert_allclose(out, shifted / 65535.0, atol=1e-7)


def test_png_rgb_and_rgba(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (H, W, 3)).astype(np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR
    out = read_image(_imwrite(tmp_path / "rgb.png", bgr))
    np.testing.assert_allclose(out, _luma(rgb) / 255.0, atol=1e-6)

    alpha = np.full((H, W, 1), 17, np.uint8)  # alpha must not leak into the gray value
    out, info = read_image_with_info(
        _imwrite(tmp_path / "rgba.png", np.concatenate([bgr, alpha], axis=2))
    )
    np.testing.assert_allclose(out, _luma(rgb) / 255.0, atol=1e-6)
    assert info.photometric == "RGBA" and "alpha channel dropped" in info.notes


def test_png_rgba_with_equal_channels_equals_gray(tmp_path):
    # Several NIH ChestX-ray14 PNGs are RGBA with R = G = B.
    g = (_pattern() // 16).astype(np.uint8)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    np.testing.assert_allclose(
        read_image(_imwrite(tmp_path / "nih.png", rgba)), g / 255.0, atol=1e-6
    )


def test_png_16bit_rgb(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    out = read_image(_imwrite(tmp_path / "rgb16.png", np.ascontiguousarray(rgb[..., ::-1])))
    np.testing.assert_allclose(out, _luma(rgb) / 65535.0, atol=1e-6)


def test_jpeg_gray_and_extension_is_ignored(tmp_path):
    yy, xx = np.mgrid[0:H, 0:W]
    a = (4 * xx + 2 * yy).astype(np.uint8)
    path = tmp_path / "actually_a_jpeg.dcm"
    import cv2

    ok, enc = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 100])
    path.write_bytes(enc.tobytes())
    assert sniff_format(path) == "jpeg"
    out, info = read_image_with_info(path)
    assert info.format == "jpeg"
    assert np.abs(out - a / 255.0).max() < 4 / 255


# --------------------------------------------------------------------------------------
# one test per UnusableImageError reason


def test_reasons_are_the_documented_codes():
    assert set(REASONS) == {
        "not_an_image",
        "no_pixel_data",
        "unsupported_modality",
        "truncated",
        "decode_error",
        "unreadable",
        "implausible_size",
        "empty_file",
        "out_of_scope",
        "not_frontal",
    }
    with pytest.raises(ValueError, match="valid reasons"):
        UnusableImageError("bogus", "x")


def test_error_survives_pickling():
    # DataLoader workers send exceptions to the main process by pickling them.
    err = pickle.loads(pickle.dumps(UnusableImageError("truncated", "cut short")))
    assert (err.reason, str(err)) == ("truncated", "cut short")


@pytest.mark.parametrize(
    "content, hint",
    [
        (b"patient list\nline 2\n" * 20, "text file"),
        (b"<!DOCTYPE html><html><body>Session expired</body></html>" * 5, "HTML"),
        (bytes(range(256)) * 4, ""),
        (b"\x1f\x8b\x08\x00" + bytes(300), "gzip archive: unpack it"),
        (b"II*\x00" + bytes(300), "TIFF image"),
    ],
    ids=["text", "html", "binary", "gzip", "tiff"],
)
def test_not_an_image(tmp_path, content, hint):
    path = tmp_path / "report.dcm"
    path.write_bytes(content)
    assert sniff_format(path) is None
    err = _expect_unusable(path, "not_an_image")
    assert hint in str(err)


def _file_meta(sop_class) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    return meta


def test_structured_report_has_no_pixel_data(tmp_path):
    ds = Dataset()
    ds.file_meta = _file_meta(uid.BasicTextSRStorage)
    ds.SOPClassUID = uid.BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-123456"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    err = _expect_unusable(path, "no_pixel_data")
    assert "Basic Text SR" in str(err)
    assert "Doe" not in str(err) and "MRN-123456" not in str(err)


def test_dicomdir_has_no_pixel_data(tmp_path):
    from pydicom.fileset import FileSet

    image = _write(tmp_path, "img.dcm", _pattern())
    fs = FileSet()
    fs.add(image)
    fs.write(tmp_path / "export")
    dicomdir = tmp_path / "export" / "DICOMDIR"
    assert dicomdir.exists()
    err = _expect_unusable(dicomdir, "no_pixel_data")
    assert "Media Storage Directory" in str(err)


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "MG"])
def test_unsupported_modality(tmp_path, modality):
    err = _expect_unusable(
        _write(tmp_path, "x.dcm", _pattern(), modality=modality), "unsupported_modality"
    )
    assert repr(modality) in str(err) and "CR" in str(err)


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", "OT"])
def test_radiograph_modalities_are_accepted(tmp_path, modality):
    out, info = read_image_with_info(_write(tmp_path, "x.dcm", _pattern(), modality=modality))
    _check_contract(out)
    assert any("secondary capture" in n for n in info.notes) == (modality == "OT")


@pytest.mark.parametrize("ts", [uid.ExplicitVRLittleEndian, uid.RLELossless], ids=lambda t: t.name)
def test_truncated_mid_pixel_data(tmp_path, ts):
    src = _write(tmp_path, "full.dcm", _pattern(), transfer_syntax=ts)
    data = open(src, "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    err = _expect_unusable(cut, "truncated")
    assert "cut short" in str(err)


@pytest.mark.parametrize("keep", [150, 400, 700])
def test_truncated_mid_header(tmp_path, keep):
    src = _write(tmp_path, "full.dcm", _pattern())
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(open(src, "rb").read()[:keep])
    err = _expect_unusable(cut, "truncated")
    assert "cut short" in str(err)


def test_cut_ct_header_is_unsupported_modality_not_truncated(tmp_path):
    # In a mixed export a damaged CT slice is to be skipped like any CT, not chased as damage.
    src = _write(tmp_path, "ct.dcm", _pattern(), modality="CT")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(open(src, "rb").read()[:700])
    _expect_unusable(cut, "unsupported_modality")


def test_missing_required_tag_is_truncated(tmp_path):
    src = _write(tmp_path, "full.dcm", _pattern())
    ds = pydicom.dcmread(src)
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm")
    err = _expect_unusable(tmp_path / "norows.dcm", "truncated")
    assert "Rows" in str(err)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_png_and_jpeg(tmp_path, ext):
    path = _imwrite(tmp_path / f"x{ext}", (_pattern() // 16).astype(np.uint8))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _expect_unusable(path, "truncated")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_bytes_appended_after_png_or_jpeg_end_are_tolerated(tmp_path, ext):
    a = (_pattern() // 16).astype(np.uint8)
    path = _imwrite(tmp_path / f"x{ext}", a)
    ref = read_image(path)
    with open(path, "ab") as f:
        f.write(b"trailing metadata from some exporter")
    np.testing.assert_array_equal(read_image(path), ref)


CODECS = [
    uid.RLELossless,
    uid.JPEG2000Lossless,
    uid.JPEGLSLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
]


@pytest.mark.parametrize("damage", ["garbage-after-16-bytes", "garbage-second-half", "zeros"])
@pytest.mark.parametrize("ts", CODECS, ids=lambda t: t.keyword)
def test_corrupt_compressed_data_is_decode_error(tmp_path, ts, damage):
    # Regression guard for two codec failure modes seen here: GDCM aborting the process on a
    # corrupt JPEG 2000 stream, and pylibjpeg-rle raising a Rust panic (not an Exception).
    if ts not in ENCODABLE:
        pytest.skip(f"{ts.name} cannot be encoded here")
    from pydicom.encaps import encapsulate, generate_frames

    pixels, extra = (
        (_pattern(255, (64, 64)).astype(np.uint8), {})
        if ts == uid.JPEGBaseline8Bit
        else (_pattern(4095, (64, 64)), {"BitsStored": 12})
    )
    ds = pydicom.dcmread(_write(tmp_path, "ok.dcm", pixels, transfer_syntax=ts, **extra))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    noise = bytes(np.random.default_rng(0).integers(0, 256, len(frame), dtype=np.uint8))
    keep = {"garbage-after-16-bytes": 16, "garbage-second-half": len(frame) // 2, "zeros": 0}[
        damage
    ]
    filler = bytes(len(frame)) if damage == "zeros" else noise
    # The last 4 bytes (end marker and padding) stay: this is damage, not a cut (tested below).
    bad = frame[:keep] + filler[keep : len(frame) - 4] + frame[-4:]
    ds.PixelData = encapsulate([bad])
    ds.save_as(tmp_path / "bad.dcm")
    if ts == uid.JPEG2000Lossless and damage == "garbage-second-half":
        # JPEG 2000 is built to survive damage: openjpeg decodes a garbled tail into a degraded
        # image without any error, so all that can be asserted is the output contract.
        try:
            _check_contract(read_image(tmp_path / "bad.dcm"), (64, 64))
        except UnusableImageError as exc:
            assert exc.reason == "decode_error"
        return
    err = _expect_unusable(tmp_path / "bad.dcm", "decode_error")
    assert ts.name in str(err)


@pytest.mark.parametrize("ts", CODECS, ids=lambda t: t.keyword)
def test_cut_codestream_inside_complete_file(tmp_path, ts):
    # The file structure is intact (a re-wrapped export), only the codestream is cut: JPEG
    # decoders would fill the rest with gray, so the missing end marker must be caught.
    if ts not in ENCODABLE:
        pytest.skip(f"{ts.name} cannot be encoded here")
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(
        _write(tmp_path, "ok.dcm", _pattern(255, (64, 64)).astype(np.uint8), transfer_syntax=ts)
    )
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: (len(frame) // 4) * 2]])  # first half, even length
    ds.save_as(tmp_path / "cut.dcm")
    expected = "decode_error" if ts == uid.RLELossless else "truncated"
    _expect_unusable(tmp_path / "cut.dcm", expected)


def test_unknown_transfer_syntax_is_decode_error(tmp_path):
    src = _write(tmp_path, "ok.dcm", _pattern())
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(tmp_path / "private.dcm", implicit_vr=False, little_endian=True)
    _expect_unusable(tmp_path / "private.dcm", "decode_error")


def test_corrupt_png_is_decode_error(tmp_path):
    path = _imwrite(tmp_path / "x.png", (_pattern() // 16).astype(np.uint8))
    data = bytearray(open(path, "rb").read())
    data[40:-20] = bytes(len(data) - 60)  # zero the compressed stream, keep header and IEND
    open(path, "wb").write(bytes(data))
    _expect_unusable(path, "decode_error")


def test_unreadable_directory_and_missing_file(tmp_path):
    err = _expect_unusable(tmp_path, "unreadable")
    assert "directory" in str(err)
    err = _expect_unusable(tmp_path / "nope.dcm", "unreadable")
    assert "not found" in str(err)
    with pytest.raises(UnusableImageError) as excinfo:
        sniff_format(tmp_path / "nope.dcm")
    assert excinfo.value.reason == "unreadable"


def test_unreadable_permission_denied_mocked(tmp_path, monkeypatch):
    # Runs as root too (root reads a chmod-000 file), unlike the real chmod test below.
    path = _write(tmp_path, "x.dcm", _pattern())
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    err = _expect_unusable(path, "unreadable")
    assert "permission denied" in str(err)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod-000 file"
)
def test_unreadable_permission_denied_chmod(tmp_path):
    path = _write(tmp_path, "x.dcm", _pattern())
    os.chmod(path, 0)
    try:
        _expect_unusable(path, "unreadable")
    finally:
        os.chmod(path, 0o600)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    _expect_unusable(path, "empty_file")
    with pytest.raises(UnusableImageError) as excinfo:
        sniff_format(path)
    assert excinfo.value.reason == "empty_file"


@pytest.mark.parametrize("shape", [(4, 4), (32, 400)], ids=["tiny", "aspect"])
def test_implausible_size_dicom(tmp_path, shape):
    err = _expect_unusable(_write(tmp_path, "s.dcm", np.ones(shape, np.uint16)), "implausible_size")
    assert f"{shape[0]}x{shape[1]}" in str(err)


def test_implausible_size_png(tmp_path):
    _expect_unusable(_imwrite(tmp_path / "s.png", np.ones((4, 4), np.uint8)), "implausible_size")


def test_messages_carry_no_identifiers_or_path(tmp_path):
    d = tmp_path / "DOE_JANE_MRN123"
    d.mkdir()
    path = _write(
        d, "x.dcm", _pattern(), modality="CT", patient_name="Doe^Jane", patient_id="MRN123"
    )
    err = _expect_unusable(path, "unsupported_modality")
    assert "Doe" not in str(err) and "MRN123" not in str(err) and "DOE_JANE" not in str(err)
    _, info = read_image_with_info(
        _write(d, "ok.dcm", _pattern(), patient_name="Doe^Jane", patient_id="MRN123")
    )
    assert not any("Doe" in n or "MRN123" in n for n in info.notes)


def test_image_info_fields():
    info = ImageInfo(format="png", height=1, width=2)
    assert info.notes == [] and info.sop_instance_uid is None


# --------------------------------------------------------------------------------------
# real chest CR (pydicom-data)


def _testdata(name: str) -> str:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom.data not available")
    # get_testdata_file looks in the installed pydicom-data package first; it would try to
    # download only when the file is absent, which we avoid by checking the package.
    try:
        import data_store  # noqa: F401 — the module pydicom-data installs
    except ImportError:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data): no real RG1 files")
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom-data")
    return path


def test_real_cr_lossless_j2k_matches_uncompressed():
    ref, info = read_image_with_info(_testdata("RG1_UNCR.dcm"))
    out = read_image(_testdata("RG1_J2KR.dcm"))
    _check_contract(ref, (1955, 1841))
    assert info.photometric == "MONOCHROME1" and "MONOCHROME1 inverted" in info.notes
    np.testing.assert_array_equal(out, ref)


def test_real_cr_monochrome1_equals_monochrome2_version(tmp_path):
    # RG1 is MONOCHROME1. The MONOCHROME2 twin stores max - v and mirrors the window
    # (center c -> max - c) so that both describe the same displayed image.
    src = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(src)
    top = 2 ** int(ds.BitsStored) - 1
    ds.PixelData = (top - ds.pixel_array).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter = top - float(ds.WindowCenter)
    ds.save_as(tmp_path / "rg1_m2.dcm")
    m1 = read_image(src)
    m2 = read_image(tmp_path / "rg1_m2.dcm")
    np.testing.assert_allclose(m1, m2, atol=1e-4)
    # Bright bones and mediastinum: the centre of a chest film is brighter than its corners,
    # where there is only air outside the patient.
    h, w = m1.shape
    centre = m1[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    corner = m1[: h // 10, : w // 10].mean()
    assert centre > corner


@pytest.mark.parametrize(
    "reference, compressed",
    [
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ],
)
def test_real_encodings_match(tmp_path, reference, compressed):
    # Files encoded by other toolkits (pydicom's own test files, shipped with pydicom). They
    # are MR, which the reader rejects, so the copies are relabelled as DX.
    from pydicom.data import get_testdata_file

    outs = []
    for name in (reference, compressed):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.Modality = "DX"
        ds.save_as(tmp_path / name)
        outs.append(read_image(tmp_path / name))
    np.testing.assert_array_equal(outs[1], outs[0])


# --------------------------------------------------------------------------------------
# the writer helper


def test_write_dicom_makes_valid_files_with_new_uids(tmp_path):
    p1, p2 = tmp_path / "a.dcm", tmp_path / "b.dcm"
    write_dicom(p1, _pattern(), modality="CR", patient_name="Test^One", patient_id="T1")
    write_dicom(p2, _pattern())
    a, b = pydicom.dcmread(p1), pydicom.dcmread(p2)  # force=False: preamble and meta present
    assert a.SOPClassUID == uid.ComputedRadiographyImageStorage
    assert b.SOPClassUID == uid.DigitalXRayImageStorageForPresentation
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert a[keyword].value != b[keyword].value
    assert (str(a.PatientName), a.PatientID) == ("Test^One", "T1")
    assert uid.RLELossless in ENCODABLE


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"WindowCentre": 10}, "not DICOM keywords"),
        ({"photometric": "CMYK"}, "photometric"),
        ({"transfer_syntax": "1.2.3"}, "transfer syntax"),
    ],
)
def test_write_dicom_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_dicom(tmp_path / "x.dcm", _pattern(), **kwargs)


def test_write_dicom_rejects_float_pixels(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_dicom(tmp_path / "x.dcm", np.zeros((H, W), np.float32))
