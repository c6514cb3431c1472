"""Builders of real DICOM files for the ingestion and screening tests.

No ophthalmic DICOM ships offline (pydicom and pydicom-data hold none), so we build Ophthalmic
Photography files with pydicom from the real CC0 fundus photograph in scikit-image
(`skimage.data.retina()`), in every transfer syntax and photometric layout the reader supports, plus
the broken files a real PACS export contains. Everything is encoded by real codecs (Pillow's JPEG,
OpenJPEG, pydicom's RLE encoder), so the reader is exercised end to end, never mocked.

Identifiers are deliberately distinctive strings (`PID-QX…`, `Zyxwv^…`, `ACCQX…`) so a privacy test
can grep the bytes of a site directory for them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Every good kind and the number of frames (= accepted images) it yields.
GOOD_KINDS: dict[str, int] = {
    "explicit_rgb": 1,
    "jpeg_ybr422": 1,
    "j2k_lossless": 1,
    "rle": 1,
    "monochrome": 1,
    "planar1": 1,
    "op16": 1,
    "multiframe": 3,
    "vl_photo": 1,
    "sc_fundus": 1,
}
# Every broken kind and the quarantine reason the reader must give it.
BAD_KINDS: dict[str, str] = {
    "truncated": "truncated",
    "truncated_jpeg": "truncated",
    "no_pixel_data": "no_pixel_data",
    "ct": "wrong_modality",
    "size_mismatch": "size_mismatch",
    "absurd": "absurd_dimensions",
    "bad_jpeg": "decode_failure",
    "not_dicom": "not_dicom",
}


@dataclass(frozen=True)
class Identity:
    """Who and what a file belongs to. Distinctive values, so leaks are greppable."""

    patient_id: str = "PID-QX00001"
    patient_name: str = "Zyxwv^Quentin"
    accession: str = "ACCQX000001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    sop_uid: str = field(default_factory=generate_uid)
    laterality: str | None = "L"
    birth_date: str = "19500101"


def identity(n: int, laterality: str | None = "L", study: int | None = None) -> Identity:
    """Identity number `n`; images of one study share `study` (defaults to `n`)."""
    s = n if study is None else study
    return Identity(
        patient_id=f"PID-QX{s:05d}",
        patient_name=f"Zyxwv^Patient{s:05d}",
        accession=f"ACCQX{s:06d}",
        study_uid=f"1.2.826.0.1.3680043.8.498.{10_000 + s}",
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        laterality=laterality,
    )


@lru_cache(maxsize=8)
def _retina_base(size: int) -> np.ndarray:
    from skimage import data

    img = Image.fromarray(data.retina()).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def fundus_rgb(size: int = 96, variant: int = 0) -> np.ndarray:
    """The real scikit-image fundus photo at `size`, with a variant-specific brightness gain and bright
    spot, so different variants never share canonical pixels."""
    img = _retina_base(size).astype(np.float32) * (1.0 - 0.004 * (variant % 100))
    rng = np.random.default_rng(variant)
    cy, cx = (rng.integers(size // 3, 2 * size // 3, size=2)).tolist()
    r = max(2, size // 24)
    img[cy - r : cy + r, cx - r : cx + r, :] = 250.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _base(ident: Identity, sop_class: str, modality: str, syntax: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ident.sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ident.sop_uid
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.PatientID = ident.patient_id
    ds.PatientName = ident.patient_name
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = "F"
    ds.AccessionNumber = ident.accession
    ds.Modality = modality
    ds.StudyDate = "20240311"
    ds.AcquisitionDateTime = "20240311101530"
    ds.ContentDate = "20240311"
    ds.Manufacturer = "Topcon"
    ds.ManufacturerModelName = "TRC-NW400"
    ds.InstanceNumber = 1
    if ident.laterality:
        ds.ImageLaterality = ident.laterality
    return ds


def _set_native(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int | None = None) -> None:
    samples = 1 if arr.ndim == 2 or (arr.ndim == 3 and photometric.startswith("MONO")) else 3
    bits_alloc = arr.dtype.itemsize * 8
    frames = arr.shape[0] if (arr.ndim == 4 or (arr.ndim == 3 and samples == 1)) else 1
    rows, cols = (arr.shape[-3], arr.shape[-2]) if samples == 3 else (arr.shape[-2], arr.shape[-1])
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored or bits_alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds["PixelData"].VR = "OW" if bits_alloc > 8 else "OB"


def _jpeg_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    # subsampling=1 is 4:2:2, i.e. YBR_FULL_422 as written by fundus cameras.
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def _set_jpeg(ds: Dataset, frames: list[np.ndarray], codestreams: list[bytes] | None = None) -> None:
    h, w = frames[0].shape[:2]
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(codestreams or [_jpeg_bytes(f) for f in frames])
    ds["PixelData"].VR = "OB"


def build_dataset(kind: str, ident: Identity | None = None, size: int = 96, variant: int = 0) -> Dataset:
    """A DICOM dataset of `kind` (a key of GOOD_KINDS, or a dataset-level broken kind)."""
    ident = ident or Identity()
    rgb = fundus_rgb(size, variant)
    if kind == "explicit_rgb":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
    elif kind == "jpeg_ybr422":
        ds = _base(ident, OP_8BIT, "OP", JPEGBaseline8Bit)
        _set_jpeg(ds, [rgb])
    elif kind in ("j2k_lossless", "rle"):
        syntax = JPEG2000Lossless if kind == "j2k_lossless" else RLELossless
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
        ds.compress(syntax, rgb, generate_instance_uid=False)
    elif kind == "monochrome":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, np.ascontiguousarray(rgb[..., 1]), "MONOCHROME2")
    elif kind == "planar1":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    elif kind == "op16":
        ds = _base(ident, OP_16BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, (rgb.astype(np.uint16) * 16), "RGB", bits_stored=12)
    elif kind == "multiframe":
        ds = _base(ident, OP_8BIT, "OP", JPEGBaseline8Bit)
        _set_jpeg(ds, [fundus_rgb(size, variant * 1000 + 500 + k) for k in range(3)])
    elif kind == "vl_photo":
        ds = _base(ident, VL_PHOTOGRAPHIC, "XC", ExplicitVRLittleEndian)
        region = Dataset()
        region.CodeValue = "81745001"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Eye"
        ds.AnatomicRegionSequence = [region]
        _set_native(ds, rgb, "RGB")
    elif kind == "sc_fundus":
        ds = _base(ident, SECONDARY_CAPTURE, "OT", ExplicitVRLittleEndian)
        ds.BodyPartExamined = "FUNDUS"
        ds.ConversionType = "DI"
        _set_native(ds, rgb, "RGB")
    elif kind == "vl_photo_skin":  # a VL photograph of something that is not an eye
        ds = _base(ident, VL_PHOTOGRAPHIC, "XC", ExplicitVRLittleEndian)
        ds.BodyPartExamined = "SKIN"
        _set_native(ds, rgb, "RGB")
    elif kind == "ct":
        ds = _base(ident, CT_IMAGE, "CT", ExplicitVRLittleEndian)
        _set_native(ds, (rgb[..., 0].astype(np.uint16) * 4), "MONOCHROME2", bits_stored=12)
    elif kind == "no_pixel_data":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
        del ds.PixelData
    elif kind == "size_mismatch":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
        ds.Rows = size + 8  # declares more rows than the pixel data holds
    elif kind == "absurd":
        ds = _base(ident, OP_8BIT, "OP", ExplicitVRLittleEndian)
        _set_native(ds, rgb, "RGB")
        ds.Rows = ds.Columns = 60000  # 10.8 GB declared, a few kB present
    elif kind == "bad_jpeg":
        ds = _base(ident, OP_8BIT, "OP", JPEGBaseline8Bit)
        junk = b"\xff\xd8\xff\xe0" + np.random.default_rng(variant).bytes(2000) + b"\xff\xd9"
        _set_jpeg(ds, [rgb], codestreams=[junk])
    else:
        raise ValueError(f"unknown DICOM kind {kind!r}")
    return ds


def write_dicom(
    path: Path, kind: str, ident: Identity | None = None, size: int = 96, variant: int = 0
) -> Path:
    """Write a file of `kind` (good or broken, see GOOD_KINDS and BAD_KINDS) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "not_dicom":
        path.write_bytes(b"Patient list export\nthis is a text file, not DICOM\n" * 8)
        return path
    if kind in ("truncated", "truncated_jpeg"):
        full = build_dataset("explicit_rgb" if kind == "truncated" else "jpeg_ybr422", ident, size, variant)
        buf = io.BytesIO()
        full.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        path.write_bytes(data[: int(len(data) * 0.7)])
        return path
    build_dataset(kind, ident, size, variant).save_as(path, enforce_file_format=True)
    return path


def with_new_uid(ident: Identity) -> Identity:
    """The same patient and study, a new SOP Instance UID (a re-export of the same pixels)."""
    return replace(ident, sop_uid=generate_uid())


def write_jpeg_export(root: Path, n: int, size: int = 64, first: int = 0) -> list[Path]:
    """`n` single-frame JPEG (YBR_FULL_422) OP files, one study each, alternating eyes, in nested folders
    the way PACS exports lay them out. Study `first + i` has accession ACCQX{first + i:06d}."""
    paths = []
    for i in range(first, first + n):
        ident = identity(i, laterality="R" if i % 2 else "L")
        paths.append(
            write_dicom(Path(root) / f"study {i // 10:03d}" / f"IM {i:05d}", "jpeg_ybr422", ident, size, i)
        )
    return paths
