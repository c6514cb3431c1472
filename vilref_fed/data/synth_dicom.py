"""Ophthalmic Photography DICOM files for synthetic hospitals, as a fundus camera's PACS export has them.

Ingestion has to be exercised on files that look like a real export: the OP 8-bit SOP class, modality
OP, patient/study/series/instance identifiers, accession number, image laterality, acquisition date
and device, and either JPEG baseline (YBR_FULL_422, what most cameras send) or uncompressed explicit
VR little endian RGB. Identifiers are synthetic but realistic, so de-identification is tested for
real. UIDs are derived from the generator's seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OP_8BIT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_SERIES_STORAGE_NAME = "Ophthalmic Photography 8 Bit Image Storage"


@dataclass(frozen=True)
class DicomIdentity:
    """Who, when and what: the header values of one photograph."""

    patient_id: str
    patient_name: str
    birth_date: str  # YYYYMMDD
    sex: str  # "M" | "F"
    accession: str
    study_uid: str
    series_uid: str
    sop_uid: str
    laterality: str  # "R" | "L"
    acquired: str  # YYYYMMDDHHMMSS
    instance_number: int
    institution: str
    manufacturer: str
    model_name: str
    station: str
    chinese: bool = False


def synth_uid(*parts: object) -> str:
    """A deterministic DICOM UID from the generator's seed and the object's place in the export."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def write_op_dicom(path: Path, rgb: np.ndarray, ident: DicomIdentity, transfer_syntax: str = "jpeg") -> None:
    """Write one OP 8-bit file. transfer_syntax: "jpeg" (JPEG baseline, lossy) or "explicit" (raw RGB)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {rgb.dtype} {rgb.shape}")
    rows, cols = rgb.shape[:2]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_8BIT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = ident.sop_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "VILREF_SYNTH_1"
    meta.TransferSyntaxUID = JPEGBaseline8Bit if transfer_syntax == "jpeg" else ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192" if ident.chinese else "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = OP_8BIT_SOP_CLASS
    ds.SOPInstanceUID = ident.sop_uid
    date, time = ident.acquired[:8], ident.acquired[8:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AcquisitionDateTime = ident.acquired
    ds.AccessionNumber = ident.accession
    ds.Modality = "OP"
    ds.Manufacturer = ident.manufacturer
    ds.ManufacturerModelName = ident.model_name
    ds.InstitutionName = ident.institution
    ds.StationName = ident.station
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Colour fundus photography"
    ds.SeriesDescription = "Fundus 45 deg colour"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.BodyPartExamined = "EYE"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = ident.accession[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = ident.instance_number
    ds.ImageLaterality = ident.laterality
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    # Ophthalmic Photography acquisition parameters (type 2: present, may be empty).
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "YES"
    ds.DetectorType = "CCD"
    eye_code = Dataset()
    eye_code.CodeValue = "81745001"
    eye_code.CodingSchemeDesignator = "SCT"
    eye_code.CodeMeaning = "Eye"
    ds.AnatomicRegionSequence = Sequence([eye_code])
    ds.AcquisitionContextSequence = Sequence([])
    ds.SamplesPerPixel = 3
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    if transfer_syntax == "jpeg":
        buf = io.BytesIO()
        # 4:2:2 chroma subsampling is what YBR_FULL_422 declares.
        Image.fromarray(rgb).save(buf, format="JPEG", quality=92, subsampling=1)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{rows * cols * 3 / max(len(buf.getvalue()), 1):.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    elif transfer_syntax == "explicit":
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(rgb).tobytes()
        ds["PixelData"].VR = "OB"
    else:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}: use 'jpeg' or 'explicit'")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
