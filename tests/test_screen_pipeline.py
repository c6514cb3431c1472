"""Screening pipeline parts: flagging and ranking against a slow reference, input discovery, the decoding
dataset (same preprocessing as training, keys computed in the worker, multi-frame files), site keys,
and a whole run with an untrained model (workers or not, the same rows)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import fundus_rgb, identity, write_dicom
from PIL import Image

from vilref_fed.data.preprocess import canonical_image, to_model_tensor
from vilref_fed.eval.screening import (
    NORMAL_LABEL,
    ScreenedImage,
    ScreeningDataset,
    ScreeningError,
    ScreenOptions,
    discover_files,
    flag_images,
    run_screening,
    short_key,
    sort_images,
)

LABELS = [NORMAL_LABEL, "glaucoma", "media_opacity", "laser_scars"]


def _reference_flags(scores, thresholds):
    """One image at a time, written out plainly."""
    flagged, margins = [], []
    for label, p in zip(LABELS, scores, strict=True):
        t = thresholds[label]
        if label == NORMAL_LABEL or t is None:
            continue
        margins.append(p - t)
        if p >= t:
            flagged.append(label)
    return flagged, max(margins)


@pytest.mark.parametrize("seed", range(10))
def test_flags_and_margin_match_reference(seed):
    rng = np.random.default_rng(seed)
    thresholds = {
        NORMAL_LABEL: 0.5,
        "glaucoma": float(rng.random()),
        "media_opacity": float(rng.random()),
        "laser_scars": None if seed % 2 else float(rng.random()),
    }
    images = [ScreenedImage(f"k{i}", f"s{i % 7}", "OD", rng.random(len(LABELS))) for i in range(50)]
    flag_images(images, LABELS, thresholds)
    for img in images:
        flagged, margin = _reference_flags(img.scores, thresholds)
        assert img.flagged == flagged
        assert img.abnormality == pytest.approx(margin)
        assert (img.abnormality >= 0) == bool(img.flagged)
    ranked = sort_images(images)
    assert [r.abnormality for r in ranked] == sorted((r.abnormality for r in images), reverse=True)
    assert sort_images(list(reversed(images))) == ranked  # ties broken by keys: order-independent


def test_no_flaggable_label_still_ranks_by_the_highest_finding_score():
    img = ScreenedImage("k", "s", "", np.array([0.9, 0.2, 0.7, 0.1]))
    flag_images([img], LABELS, {label: None for label in LABELS})
    assert img.flagged == [] and img.abnormality == pytest.approx(0.7 - 1.0)


def test_discover_files_recurses_skips_hidden_and_deduplicates(tmp_path):
    (tmp_path / "a b" / "çà").mkdir(parents=True)
    (tmp_path / "a b" / "çà" / "IM 1").write_bytes(b"x")
    (tmp_path / "a b" / "2.dcm").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.dcm").write_bytes(b"x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    files = discover_files([tmp_path, tmp_path / "a b", tmp_path / "a b" / "2.dcm"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a b/2.dcm", "a b/çà/IM 1"]
    with pytest.raises(ScreeningError, match="does not exist"):
        discover_files([tmp_path / "missing"])


def test_dataset_preprocesses_exactly_like_training_and_keys_in_the_worker(tmp_path):
    png = tmp_path / "retina.png"
    rgb = fundus_rgb(120, 3)
    Image.fromarray(rgb).save(png)
    multi = write_dicom(tmp_path / "multi.dcm", "multiframe", identity(1, laterality="R"), size=96, variant=2)
    bad = write_dicom(tmp_path / "ct.dcm", "ct", identity(2))
    key = b"k" * 32
    ds = ScreeningDataset([png, multi, bad], key, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), canonical_size=256)

    item = ds[0]
    (frame,) = item["frames"]
    expected = to_model_tensor(canonical_image(rgb, size=256), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(frame["tensor"], expected)
    assert (
        frame["study_key"] == frame["image_key"]
        and len(frame["image_key"]) == 16
        and frame["laterality"] == ""
    )

    item = ds[1]
    ident = identity(1, laterality="R")
    assert [f["frame"] for f in item["frames"]] == [0, 1, 2]
    assert {f["study_key"] for f in item["frames"]} == {short_key(key, "study", ident.study_uid)}
    assert len({f["image_key"] for f in item["frames"]}) == 3
    assert all(f["laterality"] == "OD" for f in item["frames"])
    # no identifier travels back from the worker, only keys and pixels
    flat = repr({k: v for k, v in item["frames"][0].items() if k != "tensor"})
    assert ident.study_uid not in flat and ident.patient_id not in flat

    item = ds[2]
    assert item["frames"] == [] and item["rejection"][0] == "wrong_modality"


def _export(root: Path) -> Path:
    for i, kind in enumerate(("explicit_rgb", "jpeg_ybr422", "multiframe", "rle", "monochrome")):
        write_dicom(
            root / f"study{i % 2}" / f"IM{i}", kind, identity(10 + i, study=i % 2), size=96, variant=i
        )
    write_dicom(root / "junk.dcm", "not_dicom")
    return root


def test_whole_run_same_rows_with_and_without_workers_and_stable_keys(tmp_path):
    from vilref_fed.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    meta = {"model_config": model.config.to_dict(), "prompt_language": "en"}
    export = _export(tmp_path / "export")
    out = tmp_path / "out"
    a = run_screening(model, meta, ScreenOptions([export], out, batch_size=3, workers=0, progress=False))
    rows_a = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    b = run_screening(model, meta, ScreenOptions([export], out, batch_size=4, workers=2, progress=False))
    rows_b = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert a["counts"]["images_screened"] == b["counts"]["images_screened"] == 7  # 4 single + 3 frames
    assert a["counts"]["studies_screened"] == 2 and a["counts"]["files_rejected"] == 1
    by_key = {r["image_key"]: r for r in rows_b}
    assert {r["image_key"] for r in rows_a} == set(by_key)  # same per-directory key on the rerun
    for r in rows_a:
        for col in r:
            if col.startswith("p_"):
                assert abs(float(r[col]) - float(by_key[r["image_key"]][col])) < 2e-4


def test_site_dir_keys_are_the_site_study_hashes(tmp_path):
    from vilref_fed.data.site import init_site
    from vilref_fed.model import build_model

    site = init_site(tmp_path / "site", name="Test Eye Clinic")
    expected = {site.key("study", identity(10 + i, study=i % 2).study_uid)[:16] for i in range(2)}
    site.close()
    model = build_model("tiny")
    meta = {"model_config": model.config.to_dict(), "prompt_language": "en"}
    export = _export(tmp_path / "export")
    opts = ScreenOptions([export], tmp_path / "out", workers=0, progress=False, site_dir=tmp_path / "site")
    run_screening(model, meta, opts)
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv", encoding="utf-8")))
    assert {r["study_key"] for r in rows} == expected
    assert not (tmp_path / "out" / "private" / "screen.key").exists()  # the site's secret was used
    with pytest.raises(ScreeningError, match="not a site"):
        run_screening(
            model, meta, ScreenOptions([export], tmp_path / "o2", site_dir=tmp_path, progress=False)
        )


def test_output_inside_the_export_is_not_screened_and_a_missing_gpu_is_one_line(tmp_path):
    from vilref_fed.eval.screening import select_device
    from vilref_fed.model import build_model

    model = build_model("tiny")
    meta = {"model_config": model.config.to_dict(), "prompt_language": "en"}
    export = tmp_path / "export"
    write_dicom(export / "IM0", "explicit_rgb", identity(1), size=64)
    opts = ScreenOptions([export], export / "results", workers=0, progress=False)
    run_screening(model, meta, opts)
    second = run_screening(model, meta, opts)  # the first run's outputs sit inside the input folder
    assert second["counts"]["files_found"] == 1 and second["counts"]["files_rejected"] == 0
    if not torch.cuda.is_available():
        with pytest.raises(ScreeningError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ScreeningError, match="unknown device"):
        select_device("tpu:9")
