"""Reading and validating fundus photographs from DICOM (and PNG/JPEG) files.

One reader for ingestion and screening, so a file that screening accepts is a file training could have
seen, decoded the same way. PACS exports are messy: this module decides, from the header alone and
before any pixel bytes are touched, whether a file is a fundus photograph it can safely decode, and
otherwise returns a `Rejection` with a category and a human message. It never allocates what a
header merely declares (a 60000 x 60000 "image" is refused from its Rows/Columns), never raises on a
bad file, and never puts patient identifiers into a message.

Rejection categories (`REJECTION_REASONS`): not_dicom, truncated, no_pixel_data, wrong_modality,
size_mismatch, absurd_dimensions, decode_failure, and not_image (PNG/JPEG path only).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pydicom is imported lazily: `--help` of the CLI must stay instant.
    from pydicom.dataset import Dataset

REJECTION_REASONS: tuple[str, ...] = (
    "not_dicom",
    "truncated",
    "no_pixel_data",
    "wrong_modality",
    "size_mismatch",
    "absurd_dimensions",
    "decode_failure",
    "not_image",
)

OP_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "Wide Field Ophthalmic Photography Stereographic Projection",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "Wide Field Ophthalmic Photography 3D Coordinates",
}
# Photograph classes that may hold a fundus image; accepted only when modality or anatomy says so.
CONDITIONAL_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}
DEFAULT_FUNDUS_BODY_PARTS: tuple[str, ...] = ("EYE", "FUNDUS", "RETINA", "OCULAR FUNDUS", "FUNDUS OF EYE")
# SNOMED CT / SRT codes for eye, retina and fundus in the Anatomic Region Sequence.
DEFAULT_FUNDUS_ANATOMY_CODES: tuple[str, ...] = ("81745001", "5665001", "65784002", "T-AA000", "T-AA610")

_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float Pixel Data


@dataclass(frozen=True)
class ReadLimits:
    """What a header may declare before the file is refused as absurd (never allocated)."""

    max_side: int = 16384
    max_frames: int = 1000
    max_frame_pixels: int = 150_000_000
    max_total_bytes: int = 4 * 1024**3


@dataclass(frozen=True)
class FundusRule:
    """Which non-OP photographs count as fundus photographs (site.toml can extend the lists)."""

    modalities: tuple[str, ...] = ("OP",)
    body_parts: tuple[str, ...] = DEFAULT_FUNDUS_BODY_PARTS
    anatomy_codes: tuple[str, ...] = DEFAULT_FUNDUS_ANATOMY_CODES


@dataclass(frozen=True)
class Rejection:
    """Why a file was refused: a category from REJECTION_REASONS and a message for a person."""

    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


class DicomRejected(Exception):
    """Raised inside decoding to carry a Rejection out of an iterator."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


@dataclass(frozen=True)
class DicomHeader:
    """The header facts ingestion and screening need. Identifiers are kept out of repr() so a stray
    log line or traceback cannot print them; callers store only keyed hashes of them."""

    sop_class_uid: str
    sop_class_name: str
    modality: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int
    photometric: str
    laterality: str | None
    acquisition_date: str | None
    manufacturer: str | None
    model_name: str | None
    sop_instance_uid: str = field(repr=False)
    study_instance_uid: str = field(repr=False)
    series_instance_uid: str = field(repr=False)
    patient_id: str = field(repr=False)
    accession_number: str = field(repr=False)


@dataclass(frozen=True)
class FrameResult:
    """One decoded image: `pixels` is display-ready (RGB, or grey with MONOCHROME1 inverted) in the
    file's bit depth; `header` is None for PNG/JPEG files."""

    index: int
    pixels: np.ndarray = field(repr=False)
    header: DicomHeader | None

    def rgb(self) -> np.ndarray:
        """HxWx3 uint8, rescaled by the frame's dynamic range (16-bit files included)."""
        from vilref_fed.data.preprocess import to_rgb_uint8

        return to_rgb_uint8(self.pixels)


@dataclass
class OpenedDicom:
    """A validated file whose pixels have not been decoded yet (see `decode_frames`)."""

    path: Path
    header: DicomHeader
    dataset: Dataset = field(repr=False)


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not reject an otherwise good image
        return None
    if value is None:
        return None
    s = str(value).strip().strip("\x00").strip()
    return s or None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        return int(value)
    except Exception:
        return default


def _short(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line; decoder messages can be long and multi-line."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _sniff(path: Path) -> str:
    """'preamble' (standard Part 10 file), 'raw' (a dataset without preamble: it starts with a group
    0002 or 0008 element, little or big endian) or 'other'. Only the first two are parsed, so a
    large non-DICOM file in an export is never fed to pydicom's forgiving parser."""
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "preamble"
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return "raw"
    return "other"


def _truncation(ds: Dataset, file_size: int, eof_warned: bool) -> str | None:
    """Why the file looks cut short, or None. pydicom reads short values silently, so check that every
    top-level element's declared length fits inside the file."""
    if eof_warned:
        return "the file ends before the end of its encapsulated data"
    meta = getattr(ds, "file_meta", None)
    group_length = _int(meta, "FileMetaInformationGroupLength") if meta is not None else None
    if group_length is not None and 132 + 12 + group_length > file_size:
        return "the file ends inside its File Meta Information header"
    if len(ds) == 0:
        return "the file ends after its File Meta Information header"
    datasets = [meta, ds] if meta is not None else [ds]
    for tag, raw in ((t, d.get_item(t, keep_deferred=True)) for d in datasets for t in list(d.keys())):
        length = getattr(raw, "length", None)
        value_tell = getattr(raw, "value_tell", None)
        if length is None or value_tell is None or length == _UNDEFINED_LENGTH:
            continue
        value = getattr(raw, "value", None)
        if value is None and length > 0 and value_tell + length > file_size:
            return (
                f"element ({tag.group:04X},{tag.element:04X}) declares {length} bytes but the file ends "
                f"{value_tell + length - file_size} bytes early"
            )
        if isinstance(value, bytes | bytearray) and len(value) < length:
            return (
                f"element ({tag.group:04X},{tag.element:04X}) is cut short ({len(value)} of {length} bytes)"
            )
    return None


def _is_fundus(ds: Dataset, sop_class: str, rule: FundusRule) -> tuple[bool, str]:
    modality = (_text(ds, "Modality") or "").upper()
    if sop_class in OP_SOP_CLASSES:
        return True, OP_SOP_CLASSES[sop_class]
    name = CONDITIONAL_SOP_CLASSES.get(sop_class)
    if name is None:
        try:
            from pydicom.uid import UID

            uid_name = UID(sop_class).name if sop_class else "no SOP class"
        except Exception:
            uid_name = sop_class
        return False, f"{uid_name} (modality {modality or 'none'}) is not a fundus photograph"
    if modality and modality in rule.modalities:
        return True, name
    body = " ".join((_text(ds, "BodyPartExamined") or "").upper().replace("_", " ").split())
    if body and body in rule.body_parts:
        return True, name
    try:
        for item in ds.get("AnatomicRegionSequence") or []:
            if str(item.get("CodeValue", "")).strip() in rule.anatomy_codes:
                return True, name
    except Exception:
        pass
    return False, (
        f"{name} image with modality {modality or 'none'} and body part {body or 'none'}: "
        "neither says fundus/OP"
    )


def _laterality(ds: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        v = (_text(ds, keyword) or "").upper()
        if v in ("R", "L", "B"):
            return v
    return None


def _acquisition_date(ds: Dataset) -> str | None:
    for keyword in ("AcquisitionDateTime", "AcquisitionDate", "ContentDate", "StudyDate"):
        v = _text(ds, keyword)
        if v and len(v) >= 8 and v[:8].isdigit():
            return v[:8]
    return None


def _expected_native_bytes(rows: int, cols: int, spp: int, bits: int, frames: int) -> int:
    if bits == 1:
        return math.ceil(rows * cols * spp * frames / 8)
    return rows * cols * spp * math.ceil(bits / 8) * frames


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records quote element values (a malformed PatientID, a UID): silence
    them, and skip value validation, which only produces such messages and never changes a decision."""
    import pydicom.config as cfg

    logger = logging.getLogger("pydicom")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    saved = cfg.settings.reading_validation_mode
    cfg.settings.reading_validation_mode = cfg.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cfg.settings.reading_validation_mode = saved


def inspect_dicom(
    path: str | os.PathLike[str],
    limits: ReadLimits = ReadLimits(),
    rule: FundusRule = FundusRule(),
) -> OpenedDicom | Rejection:
    """Validate a file from its header only: every check that can be made without decoding pixels."""
    with quiet_pydicom():
        return _inspect(path, limits, rule)


def _inspect(path: str | os.PathLike[str], limits: ReadLimits, rule: FundusRule) -> OpenedDicom | Rejection:
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        file_size = p.stat().st_size
        kind = _sniff(p)
    except OSError as exc:
        return Rejection("not_dicom", f"cannot read the file: {exc.strerror or _short(exc)}")
    if file_size == 0:
        return Rejection("not_dicom", "empty file")
    if kind == "other":
        return Rejection("not_dicom", "no DICOM header ('DICM' marker) found")
    preamble = kind == "preamble"

    eof_warned = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if preamble:
                ds = pydicom.dcmread(p, defer_size=_DEFER_BYTES)
            else:
                # Some exports omit the 128-byte preamble; accept such a file only if it parses into
                # something that really is an image dataset.
                ds = pydicom.dcmread(p, defer_size=_DEFER_BYTES, force=True)
        eof_warned = any("End of file" in str(w.message) for w in caught)
    except InvalidDicomError:
        return Rejection("not_dicom", "no DICOM header ('DICM' marker) found")
    except (EOFError, OSError) as exc:
        if preamble:
            return Rejection("truncated", f"the file ends inside its header ({_short(exc)})")
        return Rejection("not_dicom", "not a DICOM file")
    except Exception as exc:
        if preamble:
            return Rejection("not_dicom", f"unreadable DICOM header: {_short(exc)}")
        return Rejection("not_dicom", "not a DICOM file")

    sop_class = (
        _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID") or ""
    )
    if not preamble and not (sop_class and "Rows" in ds):
        return Rejection("not_dicom", "no DICOM header ('DICM' marker) found")

    why = _truncation(ds, file_size, eof_warned)
    if why:
        return Rejection("truncated", f"truncated file: {why}")

    if sop_class == "1.2.840.10008.1.3.10":
        return Rejection("wrong_modality", "DICOMDIR index file, not an image")
    ok, description = _is_fundus(ds, sop_class, rule)
    if not ok:
        return Rejection("wrong_modality", description)

    if not any(t in ds for t in _PIXEL_TAGS):
        if "Rows" not in ds and "Columns" not in ds:
            # An image file cut before its image module: every image IOD requires Rows/Columns.
            return Rejection(
                "truncated", "truncated file: it ends before its image attributes and Pixel Data"
            )
        return Rejection("no_pixel_data", f"{description} file without Pixel Data")

    rows = _int(ds, "Rows", 0) or 0
    cols = _int(ds, "Columns", 0) or 0
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated", 8) or 8
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if rows <= 0 or cols <= 0:
        return Rejection("absurd_dimensions", f"declared size {rows}x{cols} has no pixels")
    if spp not in (1, 3) or bits not in (1, 8, 16, 32) or frames < 1:
        return Rejection(
            "absurd_dimensions",
            f"unsupported layout: {spp} samples/pixel, {bits} bits allocated, {frames} frames",
        )
    declared = _expected_native_bytes(rows, cols, spp, bits, frames)
    if (
        rows > limits.max_side
        or cols > limits.max_side
        or rows * cols > limits.max_frame_pixels
        or frames > limits.max_frames
        or declared > limits.max_total_bytes
    ):
        return Rejection(
            "absurd_dimensions",
            f"declared {rows}x{cols} x {frames} frame(s) ({declared / 1e6:.0f} MB) exceeds the limits "
            f"(side <= {limits.max_side}, frames <= {limits.max_frames}); not allocated",
        )

    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    try:
        from pydicom.uid import UID

        compressed = bool(syntax) and UID(syntax).is_compressed
    except Exception:
        compressed = False
    if not compressed and 0x7FE00010 in ds:
        photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
        if photometric == "YBR_FULL_422" and spp == 3 and bits >= 8:
            declared = declared * 2 // 3  # native 4:2:2 stores two samples per pixel
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        length = getattr(raw, "length", None)
        if length is None:  # already converted (small element)
            length = len(ds.PixelData or b"")
        if length not in (declared, declared + 1):
            return Rejection(
                "size_mismatch",
                f"Pixel Data holds {length} bytes but {rows}x{cols}x{spp} at {bits} bits x {frames} frame(s) "
                f"needs {declared}",
            )

    header = DicomHeader(
        sop_class_uid=sop_class,
        sop_class_name=description,
        modality=(_text(ds, "Modality") or "").upper(),
        transfer_syntax_uid=syntax,
        rows=rows,
        columns=cols,
        samples_per_pixel=spp,
        bits_allocated=bits,
        number_of_frames=frames,
        photometric=(_text(ds, "PhotometricInterpretation") or "").upper(),
        laterality=_laterality(ds),
        acquisition_date=_acquisition_date(ds),
        manufacturer=_text(ds, "Manufacturer"),
        model_name=_text(ds, "ManufacturerModelName"),
        sop_instance_uid=_text(ds, "SOPInstanceUID") or "",
        study_instance_uid=_text(ds, "StudyInstanceUID") or "",
        series_instance_uid=_text(ds, "SeriesInstanceUID") or "",
        patient_id=_text(ds, "PatientID") or "",
        accession_number=_text(ds, "AccessionNumber") or "",
    )
    return OpenedDicom(path=p, header=header, dataset=ds)


def _display_ready(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Decoded frame -> what a person would see: palette applied, MONOCHROME1 inverted."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return apply_color_lut(arr, ds)
    if photometric == "MONOCHROME1":
        bits_stored = _int(ds, "BitsStored", 8) or 8
        if arr.dtype.kind in "ui":
            return (
                np.iinfo(arr.dtype).max if bits_stored >= arr.dtype.itemsize * 8 else (1 << bits_stored) - 1
            ) - arr
        return arr.max() - arr
    return arr


def _decode_failure(exc: Exception, index: int, h: DicomHeader) -> DicomRejected:
    if isinstance(exc, MemoryError):
        return DicomRejected(Rejection("absurd_dimensions", "not enough memory to decode the frame"))
    msg = _short(exc)
    if "missing dependencies" in msg or "no pixel data decoders" in msg.lower():
        msg = "no decoder for this transfer syntax is installed (" + msg[:120] + ")"
    low = msg.lower()
    reason = "truncated" if "truncated" in low and "not processed" in low else "decode_failure"
    syntax_name = _syntax_name(h.transfer_syntax_uid)
    return DicomRejected(
        Rejection(reason, f"cannot decode frame {index} ({syntax_name}, {h.photometric}): {msg}")
    )


def decode_frames(opened: OpenedDicom) -> Iterator[FrameResult]:
    """Decode one frame at a time (multi-frame files never hold every frame in memory at once).

    Raises DicomRejected (decode_failure, truncated or size_mismatch) when a frame cannot be decoded.
    """
    from pydicom.pixels import iter_pixels

    h = opened.header
    ds = opened.dataset
    with quiet_pydicom():
        frames = iter_pixels(ds)
    index = 0
    while True:
        # pydicom is quietened around each step only, never while the caller holds the frame.
        with quiet_pydicom():
            try:
                arr = next(frames)
            except StopIteration:
                break
            except Exception as exc:
                raise _decode_failure(exc, index, h) from exc
            if arr.shape[:2] != (h.rows, h.columns):
                raise DicomRejected(
                    Rejection(
                        "size_mismatch",
                        f"frame {index} decodes to {arr.shape[0]}x{arr.shape[1]} but the header declares "
                        f"{h.rows}x{h.columns}",
                    )
                )
            try:
                pixels = _display_ready(arr, ds, h.photometric)
            except Exception as exc:
                raise _decode_failure(exc, index, h) from exc
        yield FrameResult(index=index, pixels=pixels, header=h)
        index += 1
    if index != h.number_of_frames:
        raise DicomRejected(
            Rejection("size_mismatch", f"found {index} frame(s) but the header declares {h.number_of_frames}")
        )


def _syntax_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(uid).name
    except Exception:
        return uid or "no transfer syntax"


def read_fundus_dicom(
    path: str | os.PathLike[str],
    limits: ReadLimits = ReadLimits(),
    rule: FundusRule = FundusRule(),
) -> list[FrameResult] | Rejection:
    """Read a DICOM fundus photograph: every frame decoded, or a Rejection. Never raises for a bad file."""
    opened = inspect_dicom(path, limits, rule)
    if isinstance(opened, Rejection):
        return opened
    try:
        return list(decode_frames(opened))
    except DicomRejected as exc:
        return exc.rejection


def read_image_file(
    path: str | os.PathLike[str], limits: ReadLimits = ReadLimits()
) -> list[FrameResult] | Rejection:
    """Read a PNG or JPEG fundus photo (screening input) with the same limits and categories."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                if (
                    w <= 0
                    or h <= 0
                    or w > limits.max_side
                    or h > limits.max_side
                    or w * h > limits.max_frame_pixels
                ):
                    return Rejection(
                        "absurd_dimensions", f"declared {h}x{w} exceeds the limits; not allocated"
                    )
                if img.format not in ("PNG", "JPEG", "MPO"):
                    return Rejection("not_image", f"{img.format} files are not read; use PNG, JPEG or DICOM")
                img.load()
                mode = img.mode
                if mode in ("I;16", "I;16B", "I;16L", "I"):
                    pixels = np.asarray(img)
                elif mode in ("L", "RGB"):
                    pixels = np.asarray(img)
                else:
                    pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, FileNotFoundError, IsADirectoryError) as exc:
        return Rejection("not_image", f"not a PNG or JPEG image ({type(exc).__name__})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejection("absurd_dimensions", _short(exc))
    except OSError as exc:
        msg = _short(exc)
        return Rejection(
            "truncated" if "truncated" in msg.lower() else "decode_failure", f"cannot decode: {msg}"
        )
    except Exception as exc:
        return Rejection("decode_failure", f"cannot decode: {_short(exc)}")
    return [FrameResult(index=0, pixels=pixels, header=None)]


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def read_fundus_file(
    path: str | os.PathLike[str],
    limits: ReadLimits = ReadLimits(),
    rule: FundusRule = FundusRule(),
) -> list[FrameResult] | Rejection:
    """DICOM, PNG or JPEG by content (not by extension): the entry point for screening inputs."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return Rejection("not_dicom", f"cannot read the file: {exc.strerror or _short(exc)}")
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return read_image_file(path, limits)
    return read_fundus_dicom(path, limits, rule)


def header_summary(header: DicomHeader) -> dict[str, Any]:
    """Non-identifying header facts, safe to log or show."""
    return {
        "sop_class": header.sop_class_name,
        "modality": header.modality,
        "transfer_syntax": _syntax_name(header.transfer_syntax_uid),
        "size": f"{header.rows}x{header.columns}",
        "frames": header.number_of_frames,
        "photometric": header.photometric,
        "laterality": header.laterality,
    }
