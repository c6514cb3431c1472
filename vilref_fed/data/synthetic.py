"""Synthetic hospitals: a site's worth of fundus photographs, paired reports and the true labels.

We cannot download real retinal datasets here, so benchmarks and end-to-end tests run on hospitals we
generate offline. A generated site directory holds:

- `images/<accession>_<eye>.png`: the camera's photographs (site-specific size and look);
- `dicom/<patient>/<study>/IMnnnn.dcm` (with `dicom=True`): the same photographs as an Ophthalmic
  Photography PACS export (JPEG baseline or explicit VR little endian, per profile);
- `reports.csv`: `report_id,accession,study_uid,eye,report`, one row per accession (report_id ==
  accession); `eye` is OD/OS for a one-eye study and empty when the report covers both eyes with
  per-eye sections. Reports link to DICOMs by accession number (AccessionNumber) and eye
  (ImageLaterality R/L);
- `truth.csv`: `image,dicom,accession,eye,patient_id,<one 0/1 column per label id>`: the findings
  actually drawn in each image (the gold standard for evaluation);
- `report_states.jsonl`: per report and eye, the label states the text states (positive/uncertain/
  negated): the gold standard for the label extractor on these reports;
- `manifest.json`: profile, seed, counts, ontology hash.

The same (profile, seed, n) always writes the same files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vilref_fed.data.synth_dicom import DicomIdentity, synth_uid, write_op_dicom
from vilref_fed.data.synth_draw import DRAWN_LABELS, apply_camera, fov_diameter, render_fundus
from vilref_fed.data.synth_profiles import (
    LABEL_IDS,
    PROFILES,
    SiteProfile,
    get_profile,
    sample_eye_labels,
    sample_fellow_eye,
)
from vilref_fed.data.synth_reports import make_report

GENERATOR_VERSION = "2"

_FIRST_EN = (
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Susan",
    "William",
    "Karen",
    "Richard",
    "Nancy",
    "Joseph",
    "Lisa",
    "Thomas",
    "Margaret",
    "Ahmed",
    "Priya",
)
_LAST_EN = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Wilson",
    "Taylor",
    "Anderson",
    "Thomas",
    "Moore",
    "Martin",
    "Clarke",
    "Okafor",
    "Patel",
    "Nguyen",
    "Kowalski",
    "Murphy",
)
_SURNAMES_ZH = (
    ("Wang", "王"),
    ("Li", "李"),
    ("Zhang", "张"),
    ("Liu", "刘"),
    ("Chen", "陈"),
    ("Yang", "杨"),
    ("Zhao", "赵"),
    ("Huang", "黄"),
    ("Zhou", "周"),
    ("Wu", "吴"),
)
_GIVEN_ZH = (
    ("Wei", "伟"),
    ("Fang", "芳"),
    ("Min", "敏"),
    ("Jing", "静"),
    ("Lei", "磊"),
    ("Qiang", "强"),
    ("Yan", "艳"),
    ("Jun", "军"),
    ("Yang", "洋"),
    ("Xiuying", "秀英"),
    ("Jianguo", "建国"),
    ("Li", "丽"),
)


@dataclass
class SynthSummary:
    """What a generation run wrote (counts only: safe to print or log)."""

    out_dir: str
    profile: str
    language: str
    seed: int
    n_images: int
    n_reports: int
    n_patients: int
    dicom: bool
    label_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Patient:
    pid: str
    name: str
    sex: str
    birth: datetime
    diabetic: bool
    hypertensive: bool
    eyes: dict[str, frozenset[str]] = field(default_factory=dict)


def _default_ontology() -> Any:
    from vilref_fed.ontology import load_ontology

    return load_ontology()


def _check_ontology(ontology: Any) -> None:
    ids = tuple(ontology.label_ids)
    if ids != LABEL_IDS:
        raise ValueError(
            "the ontology's label list differs from the one the synthetic images are drawn for "
            f"(DESIGN.md §3.1): {ids!r}"
        )
    missing = set(ids) - DRAWN_LABELS
    if missing:  # pragma: no cover - guarded by the constant above
        raise ValueError(f"labels without a drawing: {sorted(missing)}")


def _new_patient(rng: np.random.Generator, profile: SiteProfile, seed: int, k: int, visit_date: datetime):
    age = int(rng.integers(profile.age_range[0], profile.age_range[1] + 1))
    sex = "M" if rng.random() < 0.5 else "F"
    if profile.language == "zh":
        sr, sz = _SURNAMES_ZH[int(rng.integers(len(_SURNAMES_ZH)))]
        gr, gz = _GIVEN_ZH[int(rng.integers(len(_GIVEN_ZH)))]
        name = f"{sr.upper()}^{gr.upper()}={sz}^{gz}"
    else:
        last = _LAST_EN[int(rng.integers(len(_LAST_EN)))]
        first = _FIRST_EN[int(rng.integers(len(_FIRST_EN)))]
        name = f"{last.upper()}^{first.upper()}"
    birth = visit_date - timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    return _Patient(
        pid=f"{profile.accession_prefix}-P{seed % 1000:03d}{k:05d}",
        name=name,
        sex=sex,
        birth=birth,
        diabetic=rng.random() < profile.diabetic_history_p,
        hypertensive=rng.random() < 0.25,
    )


def generate_site(
    out_dir: Path,
    n: int,
    profile: str,
    seed: int,
    dicom: bool = False,
    ontology: Any = None,
    progress: Callable[[int, int], None] | None = None,
    image_size: int | None = None,
) -> SynthSummary:
    """Write a synthetic hospital of exactly `n` images into out_dir; see the module doc.

    `image_size` scales the site's camera so that its shorter side has that many pixels (the
    camera's look is kept): tests and benchmarks whose model reads 32-64 px images generate at
    96-128 px, several times faster than the camera's native size. Refuses a non-empty out_dir
    that is not a previous synthetic site, so nothing else gets overwritten.
    """
    t0 = time.perf_counter()
    if n < 1:
        raise ValueError("n must be at least 1")
    prof = get_profile(profile)
    ontology = ontology if ontology is not None else _default_ontology()
    _check_ontology(ontology)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise FileExistsError(
            f"{out_dir} is not empty and is not a synthetic site: choose an empty directory"
        )
    if (out_dir / "manifest.json").exists():
        _remove_previous(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    profile_key = int(hashlib.sha256(prof.name.encode()).hexdigest()[:8], 16)
    camera = prof.camera
    if image_size is not None:
        if image_size < 32:
            raise ValueError("image_size must be at least 32 pixels")
        k = image_size / min(camera.width, camera.height)
        camera = replace(
            camera,
            width=max(int(round(camera.width * k)), image_size),
            height=max(int(round(camera.height * k)), image_size),
        )
    size = fov_diameter(camera)
    start_date = datetime(2023, 1, 2, 8, 0, 0)

    patients: list[_Patient] = []
    truth_rows: list[dict[str, Any]] = []
    report_rows: list[dict[str, str]] = []
    state_rows: list[dict[str, Any]] = []
    counts = dict.fromkeys(LABEL_IDS, 0)
    written = 0
    visit = 0
    while written < n:
        vrng = np.random.default_rng([seed, profile_key, visit])
        visit_date = start_date + timedelta(
            days=int(vrng.integers(0, 540)), minutes=int(vrng.integers(0, 600))
        )
        if patients and vrng.random() < 0.15:  # a follow-up visit of a known patient
            patient = patients[int(vrng.integers(len(patients)))]
        else:
            patient = _new_patient(vrng, prof, seed, len(patients), visit_date)
            patients.append(patient)
        both = vrng.random() < prof.both_eyes_p and n - written >= 2
        first_eye = "OD" if vrng.random() < 0.5 else "OS"
        eyes_imaged = ["OD", "OS"] if both else [first_eye]
        eyes: dict[str, frozenset[str]] = {}
        for eye in eyes_imaged:
            if eye in patient.eyes:  # chronic findings persist between visits
                eyes[eye] = patient.eyes[eye]
            elif eyes:
                eyes[eye] = sample_fellow_eye(vrng, prof, next(iter(eyes.values())))
            else:
                eyes[eye] = sample_eye_labels(vrng, prof)
            patient.eyes[eye] = eyes[eye]
        accession = f"{prof.accession_prefix}{seed % 1000:03d}{visit:07d}"
        study_uid = synth_uid("study", prof.name, seed, visit)
        series_uid = synth_uid("series", prof.name, seed, visit)
        age = int((visit_date - patient.birth).days // 365.25)
        report = make_report(
            vrng, ontology, prof, eyes, age, patient.sex, patient.diabetic, patient.hypertensive
        )
        report_rows.append(
            {
                "report_id": accession,
                "accession": accession,
                "study_uid": study_uid,
                "eye": report.eye,
                "report": report.text,
            }
        )
        for eye, st in report.statements.items():
            state_rows.append({"report_id": accession, "eye": eye, **st.as_dict()})
        for k, eye in enumerate(eyes_imaged):
            labels = eyes[eye]
            real = vrng.random() < prof.real_background_p
            fundus = render_fundus(vrng, labels, eye, size, pigment=prof.pigment, real_background=real)
            photo = apply_camera(fundus, camera, vrng)
            image_rel = f"images/{accession}_{eye}.png"
            Image.fromarray(photo).save(out_dir / image_rel, compress_level=1)
            dicom_rel = ""
            if dicom:
                acquired = visit_date + timedelta(seconds=40 * k + int(vrng.integers(0, 30)))
                dicom_rel = f"dicom/{patient.pid.replace('-', '')}/{study_uid[-12:]}/IM{k + 1:04d}.dcm"
                write_op_dicom(
                    out_dir / dicom_rel,
                    photo,
                    DicomIdentity(
                        patient_id=patient.pid,
                        patient_name=patient.name,
                        birth_date=patient.birth.strftime("%Y%m%d"),
                        sex=patient.sex,
                        accession=accession,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=synth_uid("sop", prof.name, seed, visit, eye),
                        laterality="R" if eye == "OD" else "L",
                        acquired=acquired.strftime("%Y%m%d%H%M%S"),
                        instance_number=k + 1,
                        institution=prof.institution,
                        manufacturer=camera.manufacturer,
                        model_name=camera.model_name,
                        station=f"{prof.accession_prefix}-FUNDUS-1",
                        chinese=prof.language == "zh",
                    ),
                    transfer_syntax=prof.transfer_syntax,
                )
            row: dict[str, Any] = {
                "image": image_rel,
                "dicom": dicom_rel,
                "accession": accession,
                "eye": eye,
                "patient_id": patient.pid,
            }
            for label in LABEL_IDS:
                row[label] = int(label in labels)
                counts[label] += int(label in labels)
            truth_rows.append(row)
            written += 1
            if progress is not None:
                progress(written, n)
        visit += 1

    with open(out_dir / "reports.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["report_id", "accession", "study_uid", "eye", "report"])
        w.writeheader()
        w.writerows(report_rows)
    with open(out_dir / "truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "dicom", "accession", "eye", "patient_id", *LABEL_IDS])
        w.writeheader()
        w.writerows(truth_rows)
    with open(out_dir / "report_states.jsonl", "w", encoding="utf-8") as f:
        for r in state_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = SynthSummary(
        out_dir=str(out_dir),
        profile=prof.name,
        language=prof.language,
        seed=seed,
        n_images=written,
        n_reports=len(report_rows),
        n_patients=len(patients),
        dicom=dicom,
        label_counts=counts,
        seconds=round(time.perf_counter() - t0, 3),
    )
    manifest = {
        "generator": "vilref_fed.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "ontology_hash": getattr(ontology, "hash", ""),
        "label_ids": list(LABEL_IDS),
        **{k: v for k, v in summary.to_dict().items() if k not in ("out_dir", "seconds")},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return summary


def _remove_previous(out_dir: Path) -> None:
    """Regenerating into a previous synthetic site: delete exactly the files it listed, nothing else."""
    truth = out_dir / "truth.csv"
    if truth.is_file():
        with open(truth, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for key in ("image", "dicom"):
                    rel = row.get(key) or ""
                    target = (out_dir / rel).resolve()
                    if rel and target.is_file() and out_dir.resolve() in target.parents:
                        target.unlink()
    for name in ("reports.csv", "truth.csv", "report_states.jsonl", "manifest.json"):
        (out_dir / name).unlink(missing_ok=True)
    dicom_dir = out_dir / "dicom"
    if dicom_dir.is_dir():
        for d in sorted((p for p in dicom_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()


def read_truth(site_dir: Path) -> tuple[list[dict[str, str]], tuple[str, ...]]:
    """truth.csv rows and the label columns, in file order."""
    with open(Path(site_dir) / "truth.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = tuple(reader.fieldnames or ())
    label_cols = tuple(c for c in fields if c in LABEL_IDS)
    return rows, label_cols


def read_reports(site_dir: Path) -> dict[str, dict[str, str]]:
    """reports.csv rows keyed by accession."""
    with open(Path(site_dir) / "reports.csv", newline="", encoding="utf-8") as f:
        return {r["accession"]: r for r in csv.DictReader(f)}


__all__ = ["PROFILES", "SynthSummary", "generate_site", "read_reports", "read_truth"]
