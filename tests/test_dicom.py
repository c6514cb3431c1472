"""The DICOM / PNG / JPEG reader against real files: OP files built from the real scikit-image fundus
photograph in every supported layout, pydicom's own colour test files, and every broken case.

References are obviously correct: the array we encoded (lossless syntaxes must round-trip exactly) and
pydicom's `pixel_array` for third-party files.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import BAD_KINDS, GOOD_KINDS, build_dataset, fundus_rgb, identity, write_dicom
from PIL import Image

from vilref_fed.data.dicom import (
    FrameResult,
    FundusRule,
    Rejection,
    read_fundus_dicom,
    read_fundus_file,
    read_image_file,
)

SIZE = 96


def _read(path: Path, **kw) -> list[FrameResult]:
    out = read_fundus_dicom(path, **kw)
    assert not isinstance(out, Rejection), out
    return out


@pytest.mark.parametrize("kind", sorted(GOOD_KINDS))
def test_good_kinds_decode_to_the_encoded_pixels(tmp_path: Path, kind: str) -> None:
    path = write_dicom(tmp_path / f"{kind}.dcm", kind, identity(7, laterality="R"), size=SIZE, variant=3)
    frames = _read(path)
    assert len(frames) == GOOD_KINDS[kind]
    src = fundus_rgb(SIZE, 3)
    for fr in frames:
        assert fr.header is not None
        assert fr.pixels.shape[:2] == (SIZE, SIZE)
        assert fr.rgb().shape == (SIZE, SIZE, 3) and fr.rgb().dtype == np.uint8
    px = frames[0].pixels
    if kind in ("explicit_rgb", "j2k_lossless", "rle", "planar1", "vl_photo", "sc_fundus"):
        np.testing.assert_array_equal(px, src)  # lossless: exact
    elif kind == "monochrome":
        np.testing.assert_array_equal(px, src[..., 1])
    elif kind == "op16":
        assert px.dtype == np.uint16
        np.testing.assert_array_equal(px, src.astype(np.uint16) * 16)
    elif kind == "jpeg_ybr422":
        assert np.abs(px.astype(int) - src).mean() < 4.0  # lossy JPEG, YBR 4:2:2 -> RGB
    elif kind == "multiframe":
        for k, fr in enumerate(frames):
            ref = fundus_rgb(SIZE, 3 * 1000 + 500 + k)
            assert np.abs(fr.pixels.astype(int) - ref).mean() < 4.0
            assert fr.index == k
    h = frames[0].header
    assert h.laterality == "R" and h.acquisition_date == "20240311"
    assert h.manufacturer == "Topcon" and h.model_name == "TRC-NW400"
    assert h.patient_id == "PID-QX00007" and h.accession_number == "ACCQX000007"
    text = repr(h) + repr(frames[0])
    assert "PID-QX" not in text and "ACCQX" not in text and "Zyxwv" not in text


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_every_bad_kind_is_rejected_with_its_category(tmp_path: Path, kind: str) -> None:
    path = write_dicom(tmp_path / f"{kind}.dcm", kind, identity(3), size=SIZE)
    out = read_fundus_dicom(path)
    assert isinstance(out, Rejection), kind
    assert out.reason == BAD_KINDS[kind], out
    assert out.message and "\n" not in out.message
    assert "PID-QX" not in out.message and "ACCQX" not in out.message and "Zyxwv" not in out.message


def test_absurd_dimensions_are_refused_without_allocating(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "absurd.dcm", "absurd", identity(1), size=64)
    tracemalloc.start()
    out = read_fundus_dicom(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(out, Rejection) and out.reason == "absurd_dimensions"
    assert "60000x60000" in out.message
    assert peak < 20 * 2**20  # 10.8 GB declared; a few MB used at most


def test_non_fundus_photographs_need_modality_or_anatomy(tmp_path: Path) -> None:
    skin = write_dicom(tmp_path / "skin.dcm", "vl_photo_skin", identity(1), size=SIZE)
    out = read_fundus_dicom(skin)
    assert isinstance(out, Rejection) and out.reason == "wrong_modality"
    assert not isinstance(read_fundus_dicom(skin, rule=FundusRule(body_parts=("SKIN",))), Rejection)
    ct = write_dicom(tmp_path / "ct.dcm", "ct", identity(1), size=SIZE)
    # A CT stays a CT whatever the site lists: only photograph classes are conditional.
    assert read_fundus_dicom(ct, rule=FundusRule(modalities=("OP", "CT"))).reason == "wrong_modality"


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.2, 0.35, 0.5, 0.8, 0.97, 0.999])
@pytest.mark.parametrize("kind", ["explicit_rgb", "jpeg_ybr422", "rle", "multiframe"])
def test_cut_files_never_raise_and_are_truncated_or_not_dicom(
    tmp_path: Path, kind: str, fraction: float
) -> None:
    buf = io.BytesIO()
    build_dataset(kind, identity(2), size=SIZE).save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * fraction)])
    out = read_fundus_dicom(path)
    assert isinstance(out, Rejection)
    expected = {"not_dicom"} if int(len(data) * fraction) < 132 else {"truncated"}
    assert out.reason in expected, (kind, fraction, out)


def test_random_corruption_never_raises(tmp_path: Path) -> None:
    buf = io.BytesIO()
    build_dataset("jpeg_ybr422", identity(2), size=SIZE).save_as(buf, enforce_file_format=True)
    data = bytearray(buf.getvalue())
    rng = np.random.default_rng(0)
    path = tmp_path / "corrupt.dcm"
    for trial in range(40):
        d = bytearray(data)
        for pos in rng.integers(132, len(d), size=int(rng.integers(1, 12))):
            d[int(pos)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(d))
        out = read_fundus_dicom(path)  # must return, whatever the bytes say
        assert isinstance(out, list | Rejection), trial


def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    ds = build_dataset("explicit_rgb", identity(4), size=SIZE)
    path = tmp_path / "nopreamble"
    ds.save_as(path, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    frames = _read(path)
    np.testing.assert_array_equal(frames[0].pixels, fundus_rgb(SIZE, 0))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(1).bytes(5000))
    assert read_fundus_dicom(junk).reason == "not_dicom"


# pydicom's own colour files: decoded by our reader exactly as pydicom decodes them.
PYDICOM_COLOUR = [
    "SC_rgb.dcm",
    "SC_rgb_2frame.dcm",
    "SC_rgb_16bit.dcm",
    "SC_rgb_expb.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
]
PYDICOM_ULTRASOUND = ["US1_UNCR.dcm", "US1_J2KR.dcm", "color-px.dcm", "examples_ybr_color.dcm"]


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"{name} not installed (pydicom-data)")
    return Path(p)


@pytest.mark.parametrize("name", PYDICOM_COLOUR)
def test_pydicom_colour_files_match_pydicom(name: str) -> None:
    path = _testdata(name)
    # Secondary captures with modality OT are not fundus photos unless the site says so.
    assert read_fundus_dicom(path).reason == "wrong_modality"
    frames = _read(path, rule=FundusRule(modalities=("OP", "OT")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pydicom.dcmread(path).pixel_array
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    assert len(frames) == n
    if n == 1:
        ref = ref[None]
    for fr, r in zip(frames, ref, strict=True):
        np.testing.assert_array_equal(fr.pixels, r)


@pytest.mark.parametrize("name", PYDICOM_ULTRASOUND)
def test_pydicom_ultrasound_colour_files_are_wrong_modality(name: str) -> None:
    out = read_fundus_dicom(_testdata(name), rule=FundusRule(modalities=("OP", "OT", "US")))
    assert isinstance(out, Rejection) and out.reason == "wrong_modality"
    assert "Ultrasound" in out.message


def test_undecodable_syntax_without_plugin_is_decode_failure() -> None:
    from pydicom.pixels import get_decoder

    path = _testdata("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless P14
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = read_fundus_dicom(path, rule=FundusRule(modalities=("OP", "OT")))
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        assert isinstance(out, list)
    else:
        assert isinstance(out, Rejection) and out.reason == "decode_failure"
        assert "no decoder" in out.message


# ------------------------------------------------------------------- PNG / JPEG


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def test_image_files(tmp_path: Path) -> None:
    rgb = fundus_rgb(SIZE, 1)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rgb).save(png)
    Image.fromarray(rgb).save(jpg, quality=95)
    np.testing.assert_array_equal(read_image_file(png)[0].pixels, rgb)
    assert np.abs(read_fundus_file(jpg)[0].pixels.astype(int) - rgb).mean() < 4
    assert read_fundus_file(png)[0].header is None
    grey = tmp_path / "g.png"
    Image.fromarray(rgb[..., 1]).save(grey)
    assert read_image_file(grey)[0].rgb().shape == (SIZE, SIZE, 3)

    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(60000, 60000))
    tracemalloc.start()
    out = read_fundus_file(huge)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(out, Rejection) and out.reason == "absurd_dimensions" and peak < 20 * 2**20

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpg.read_bytes()[:400])
    assert read_fundus_file(cut).reason in ("truncated", "decode_failure")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert read_image_file(text).reason == "not_image"
    assert read_fundus_file(text).reason == "not_dicom"
    dcm = write_dicom(tmp_path / "x.dcm", "rle", identity(1), size=SIZE)
    assert isinstance(read_fundus_file(dcm), list)


def test_reader_never_echoes_identifiers(tmp_path: Path, capfd, caplog) -> None:
    """pydicom warns about malformed values by quoting them; such messages must not escape the reader."""
    import logging

    caplog.set_level(logging.DEBUG)
    ds = build_dataset("explicit_rgb", identity(5), size=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientID = "PID-QX\\BAD\x01ID-77777"  # invalid LO value: pydicom would warn, quoting it
        ds.StudyInstanceUID = "1.2.3.PID-QX-in-a-uid"  # invalid UI value
    path = tmp_path / "bad_values.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    capfd.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = _read(path)
        _ = frames[0].header.patient_id
    out, err = capfd.readouterr()
    leaked = [str(w.message) for w in caught] + [out, err, caplog.text]
    assert not any("PID-QX" in t for t in leaked), leaked


def test_fov_bbox_matches_the_plain_reference() -> None:
    """preprocess.fov_bbox was sped up for ingestion; it must equal the obvious formulation."""
    from vilref_fed.data.preprocess import fov_bbox

    def reference(rgb: np.ndarray, threshold: int = 12) -> tuple[int, int, int, int]:
        mask = rgb.max(axis=-1) > threshold
        rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
        cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
        h, w = mask.shape
        if rows.size == 0 or cols.size == 0:
            return 0, h, 0, w
        return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1

    rng = np.random.default_rng(0)
    cases = [fundus_rgb(s, v) for s, v in ((64, 0), (97, 1), (256, 2))]
    for _ in range(300):
        shape = (int(rng.integers(3, 90)), int(rng.integers(3, 90)), 3)
        cases.append((rng.random(shape) * rng.integers(1, 40)).astype(np.uint8))
    cases.append(np.zeros((10, 20, 3), np.uint8))
    for a in cases:
        assert fov_bbox(a) == reference(a)
