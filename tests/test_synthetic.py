"""Synthetic hospitals: files, links between reports/images/DICOMs, determinism, priors, visibility."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from vilref_fed.data.synth_draw import Camera, apply_camera, render_fundus
from vilref_fed.data.synth_profiles import LABEL_IDS, PROFILES, get_profile, sample_eye_labels
from vilref_fed.data.synthetic import generate_site
from vilref_fed.ontology import load_ontology

OP_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    """One small site per profile (with DICOM), generated once for the module."""
    out = {}
    for i, name in enumerate(PROFILES):
        d = tmp_path_factory.mktemp(name)
        generate_site(d, n=14, profile=name, seed=7 + i, dicom=True, image_size=96)
        out[name] = d
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_ontology_and_generator_agree_on_labels():
    assert load_ontology().label_ids == LABEL_IDS


@pytest.mark.parametrize("name", list(PROFILES))
def test_site_files_and_links(sites, name):
    d = sites[name]
    truth = _csv(d / "truth.csv")
    reports = _csv(d / "reports.csv")
    assert len(truth) == 14
    assert list(reports[0]) == ["report_id", "accession", "study_uid", "eye", "report"]
    by_acc = {r["accession"]: r for r in reports}
    assert len(by_acc) == len(reports)  # one report per accession
    for r in reports:
        assert r["report_id"] == r["accession"] and r["report"].strip()
        eyes = sorted(t["eye"] for t in truth if t["accession"] == r["accession"])
        # A one-eye report names its eye; a both-eye report leaves it empty and has per-eye sections.
        assert (r["eye"] == "" and eyes == ["OD", "OS"]) or eyes == [r["eye"]]
    for t in truth:
        assert (d / t["image"]).is_file()
        labels = [x for x in LABEL_IDS if t[x] == "1"]
        assert labels, "every image has at least one label (normal when nothing else)"
        assert ("normal" in labels) == (labels == ["normal"])
        ds = pydicom.dcmread(d / t["dicom"])
        assert ds.SOPClassUID == OP_SOP and ds.Modality == "OP"
        assert ds.AccessionNumber == t["accession"]
        assert ds.ImageLaterality == ("R" if t["eye"] == "OD" else "L")
        assert ds.PatientID == t["patient_id"]
        assert ds.StudyInstanceUID == by_acc[t["accession"]]["study_uid"]
        assert ds.file_meta.TransferSyntaxUID == (
            "1.2.840.10008.1.2.4.50" if get_profile(name).transfer_syntax == "jpeg" else "1.2.840.10008.1.2.1"
        )
        png = np.asarray(Image.open(d / t["image"]).convert("RGB")).astype(int)
        px = ds.pixel_array.astype(int)  # pydicom converts YBR_FULL_422 to RGB
        assert px.shape == png.shape
        if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1":
            assert np.array_equal(px, png)
        else:
            assert np.abs(px - png).mean() < 4.0  # lossy JPEG, same picture
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["profile"] == name and manifest["n_images"] == 14
    assert manifest["ontology_hash"] == load_ontology().hash


def test_sop_instance_uids_unique_and_series_per_study(sites):
    uids = Counter()
    for d in sites.values():
        for f in (d / "dicom").rglob("*.dcm"):
            uids[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID] += 1
    assert uids and max(uids.values()) == 1


def test_chinese_site_writes_chinese_reports_and_names(sites):
    d = sites["myopia-clinic"]
    reports = _csv(d / "reports.csv")
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in r["report"]) for r in reports)
    f = next((d / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(f)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in str(ds.PatientName))


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_site(a, 6, "urban-dr", seed=3, image_size=64)
    generate_site(b, 6, "urban-dr", seed=3, image_size=64)
    generate_site(c, 6, "urban-dr", seed=4, image_size=64)
    for name in ("truth.csv", "reports.csv", "report_states.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    first = _csv(a / "truth.csv")[0]["image"]
    assert (a / first).read_bytes() == (b / first).read_bytes()
    assert (a / "reports.csv").read_bytes() != (c / "reports.csv").read_bytes()


def test_regenerating_replaces_only_its_own_files(tmp_path):
    d = tmp_path / "site"
    generate_site(d, 8, "balanced", seed=1, image_size=64, dicom=True)
    keep = d / "notes.txt"
    keep.write_text("mine")
    generate_site(d, 3, "balanced", seed=2, image_size=64)
    assert len(list((d / "images").glob("*.png"))) == 3
    assert not list((d / "dicom").rglob("*.dcm"))
    assert keep.read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_site(other, 2, "balanced", seed=1)


def test_report_states_match_truth_and_extractor(sites):
    """What the report states agrees with the drawn truth, and the product's extractor reads it back."""
    from vilref_fed.labels import get_extractor

    extractor = get_extractor()
    agree = total = 0
    for d in sites.values():
        truth = {
            (t["accession"], t["eye"]): {x for x in LABEL_IDS if t[x] == "1"} for t in _csv(d / "truth.csv")
        }
        reports = {r["accession"]: r["report"] for r in _csv(d / "reports.csv")}
        for line in (d / "report_states.jsonl").read_text(encoding="utf-8").splitlines():
            st = json.loads(line)
            true = truth[(st["report_id"], st["eye"])]
            stated = set(st["positive"]) | set(st["uncertain"])
            assert true - {"normal"} <= stated  # every drawn finding is reported (maybe hedged)
            assert not set(st["negated"]) & true  # a drawn finding is never denied
            got = extractor.extract(reports[st["report_id"]], eye=st["eye"])
            total += 1
            agree += (set(got.positive), set(got.uncertain), set(got.negated)) == (
                set(st["positive"]),
                set(st["uncertain"]),
                set(st["negated"]),
            )
    assert agree / total >= 0.9, f"extractor agrees with the generator on {agree}/{total} eyes"


def test_profiles_are_non_iid_with_realistic_co_occurrence():
    rng = np.random.default_rng(0)
    freq = {}
    for name in ("urban-dr", "myopia-clinic", "glaucoma-center"):
        draws = [sample_eye_labels(rng, get_profile(name)) for _ in range(3000)]
        freq[name] = {x: np.mean([x in d for d in draws]) for x in LABEL_IDS}
        dr = [d for d in draws if "diabetic_retinopathy" in d]
        if name == "urban-dr":
            me_given_dr = np.mean(["macular_edema" in d for d in dr])
            me_given_none = np.mean(["macular_edema" in d for d in draws if "diabetic_retinopathy" not in d])
            assert me_given_dr > 0.25 > me_given_none + 0.1
    assert freq["urban-dr"]["diabetic_retinopathy"] > 3 * freq["myopia-clinic"]["diabetic_retinopathy"]
    assert freq["myopia-clinic"]["tessellated_fundus"] > 3 * freq["urban-dr"]["tessellated_fundus"]
    assert freq["glaucoma-center"]["glaucoma"] > 3 * freq["urban-dr"]["glaucoma"]
    languages = {get_profile(n).language for n in ("urban-dr", "myopia-clinic", "glaucoma-center")}
    assert languages == {"en", "zh"}
    cams = {get_profile(n).camera for n in ("urban-dr", "myopia-clinic", "glaucoma-center")}
    assert len(cams) == 3


@pytest.mark.parametrize("label", [x for x in LABEL_IDS if x != "normal"])
def test_every_label_is_visible_at_model_resolution(label):
    """Drawing a finding changes what a 64 px model sees, beyond the image-to-image variation of
    healthy eyes drawn with the same randomness (so no label is invisible noise)."""
    cam = Camera(width=128, height=128, fov_fraction=0.97, noise=0.0, blur=0.0)

    def small(labels, seed):
        rng = np.random.default_rng(seed)
        img = apply_camera(render_fundus(rng, frozenset(labels), "OD", 124), cam, rng)
        return np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BILINEAR), dtype=float)

    diffs = [np.abs(small([label], s) - small(["normal"], s)).mean() for s in range(6)]
    assert min(diffs) > 0.2, f"{label} barely changes the image: {diffs}"


def test_real_background_option_uses_the_skimage_photograph():
    rng = np.random.default_rng(0)
    real = render_fundus(rng, frozenset({"glaucoma"}), "OS", 128, real_background=True)
    synth = render_fundus(np.random.default_rng(0), frozenset({"glaucoma"}), "OS", 128)
    assert real.shape == synth.shape == (128, 128, 3)
    assert np.abs(real - synth).mean() > 0.02
