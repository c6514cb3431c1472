"""End to end: a `tiny` model trained on a synthetic hospital screens a DICOM export through the real CLI.

The export mixes a synthetic hospital's Ophthalmic Photography files (with ground truth), OP files
built from the real scikit-image fundus photograph in every supported transfer syntax and layout, a
PNG and a JPEG of it, and every kind of broken file. The model is trained briefly (seeded), its
operating points calibrated on the training site's validation split with `vilref-client thresholds`,
then `vilref-client screen` runs as a separate process with decoding workers. Checked: one CSV row
per valid image, every bad file listed with its reason, flags that beat chance on the ground truth,
a report that renders in headless Chromium, and no identifier in anything outside private/.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import BAD_KINDS, GOOD_KINDS, fundus_rgb, identity, write_dicom
from PIL import Image
from test_screen_report import chromium_screenshot, colour_fraction
from typer.testing import CliRunner

from client.cli import app

pytestmark = pytest.mark.e2e

N_TRAIN = 160
N_EXPORT = 64
N_VAL = 96
runner = CliRunner()


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _misc_export(root: Path) -> dict:
    """Retina-photo OP files of every good kind, every broken kind, a PNG, a JPEG and a text file."""
    good_frames = 0
    for i, kind in enumerate(GOOD_KINDS):
        sub = "Zyxwv Quentin" if i % 2 else "néw folder"
        write_dicom(
            root / sub / f"IM{i:04d}",
            kind,
            identity(100 + i, laterality="R" if i % 2 else "L"),
            size=96,
            variant=i,
        )
        good_frames += GOOD_KINDS[kind]
    for j, kind in enumerate(BAD_KINDS):
        write_dicom(root / "broken" / f"bad_{kind}.dcm", kind, identity(200 + j), size=96, variant=50 + j)
    (root / "photos").mkdir()
    Image.fromarray(fundus_rgb(128, 7)).save(root / "photos" / "retina.png")
    Image.fromarray(fundus_rgb(128, 8)).save(root / "photos" / "retina.jpg", quality=90)
    (root / "photos" / "notes.txt").write_text("camera maintenance log\n")
    return {
        "good_images": good_frames + 2,
        "bad": {**{f"bad_{k}.dcm": v for k, v in BAD_KINDS.items()}, "notes.txt": "not_dicom"},
    }


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from vilref_fed.data.folder_dataset import FolderPairDataset
    from vilref_fed.data.synthetic import generate_site
    from vilref_fed.model import build_model, save_checkpoint
    from vilref_fed.ontology import load_ontology
    from vilref_fed.train import LocalTrainer, TrainConfig

    root = tmp_path_factory.mktemp("screen_e2e")
    train_dir, synth_dir, misc_dir = root / "train_site", root / "export_site", root / "export_misc"
    val_dir = root / "val_site"
    generate_site(train_dir, n=N_TRAIN, profile="balanced", seed=11)
    generate_site(val_dir, n=N_VAL, profile="balanced", seed=13)
    generate_site(synth_dir, n=N_EXPORT, profile="balanced", seed=12, dicom=True)
    misc = _misc_export(misc_dir)

    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = model.config
    train = FolderPairDataset(train_dir, cfg.image_size, cfg.image_mean, cfg.image_std, split="all")
    config = TrainConfig(
        lr=2e-3, batch_size=32, max_steps=60, warmup_steps=10, queue_size=256, device="cpu", seed=0, amp=False
    )
    LocalTrainer(model, config).fit(train, progress=False)
    ckpt = save_checkpoint(
        root / "tiny.pt", model, extra={"ontology_hash": load_ontology().hash, "prompt_language": "en"}
    )
    calib = cli(
        "thresholds", "--model", ckpt, "--data", val_dir, "--split", "all", "--target-sensitivity", "0.8"
    )

    out = root / "screen_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "screen",
            "--model",
            str(ckpt),
            "--input",
            str(synth_dir / "dicom"),
            "--input",
            str(misc_dir),
            "-o",
            str(out),
            "--batch-size",
            "16",
            "--workers",
            "2",
            "--thumbnails",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    return {
        "root": root,
        "ckpt": ckpt,
        "train": train_dir,
        "synth": synth_dir,
        "misc": misc_dir,
        "misc_info": misc,
        "out": out,
        "proc": proc,
        "calibration": calib.stdout,
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_screen_exits_zero_with_a_row_per_valid_image_and_lists_rejected_files(screened: dict) -> None:
    proc = screened["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "images/s" in proc.stderr  # the progress bar shows the throughput
    out = screened["out"]
    rows = _rows(out / "results.csv")
    expected = N_EXPORT + screened["misc_info"]["good_images"]
    assert len(rows) == expected
    assert len({r["image_key"] for r in rows}) == expected  # multi-frame files give one key per frame
    abn = [float(r["abnormality"]) for r in rows]
    assert abn == sorted(abn, reverse=True)  # most abnormal first
    assert {r["laterality"] for r in rows} <= {"OD", "OS", ""} and {"OD", "OS"} <= {
        r["laterality"] for r in rows
    }
    rejected = {Path(r["path"]).name: r["reason"] for r in _rows(out / "private" / "rejected.csv")}
    assert rejected == screened["misc_info"]["bad"]
    assert all(r["message"] for r in _rows(out / "private" / "rejected.csv"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["images_screened"] == expected
    assert summary["counts"]["files_rejected"] == len(rejected)
    assert summary["rejected_by_reason"]["not_dicom"] == 2
    # every label was calibrated on the validation site: a validated operating point, or not flagged
    # because its validation AUC was too low (the model file says which)
    sources = summary["threshold_sources"]
    assert set(sources.values()) <= {"model", "unreliable"} and list(sources.values()).count("model") >= 3
    assert set(summary["unreliable_labels"]) == {k for k, v in sources.items() if v == "unreliable"}
    assert "stored in" in screened["calibration"]


def test_flags_beat_chance_on_the_synthetic_ground_truth(screened: dict) -> None:
    """Hits (flagged and truly present) against what flagging the same number of images per label at
    random would give: a hypergeometric mean and variance per label, summed; require +3 sigma."""
    out, synth = screened["out"], screened["synth"]
    where = {r["image_key"]: Path(r["path"]).resolve() for r in _rows(out / "private" / "source_index.csv")}
    truth = {(synth / t["dicom"]).resolve(): t for t in _rows(synth / "truth.csv")}
    rows = [r for r in _rows(out / "results.csv") if where[r["image_key"]] in truth]
    assert len(rows) == N_EXPORT
    labels = [c[2:] for c in rows[0] if c.startswith("p_") and c != "p_normal"]
    hits = expected = variance = 0.0
    n = len(rows)
    for label in labels:
        y = np.array([int(truth[where[r["image_key"]]][label]) for r in rows])
        f = np.array([label in r["flagged"].split(";") for r in rows])
        positives, flags = int(y.sum()), int(f.sum())
        hits += float((y & f).sum())
        expected += flags * positives / n
        if n > 1:
            variance += flags * (positives / n) * (1 - positives / n) * (n - flags) / (n - 1)
    assert hits > expected + 3 * math.sqrt(variance), (hits, expected, variance)
    # and the ranking puts diseased eyes first: abnormality AUC against "any finding"
    any_finding = np.array([any(int(truth[where[r["image_key"]]][lab]) for lab in labels) for r in rows])
    score = np.array([float(r["abnormality"]) for r in rows])
    pos, neg = score[any_finding], score[~any_finding]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc > 0.5, auc


def test_report_renders_in_chromium_with_thumbnails(screened: dict) -> None:
    out = screened["out"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") >= 1  # --thumbnails was given
    shot = chromium_screenshot(out / "report.html", screened["root"] / "report.png", height=2400)
    assert colour_fraction(shot, (0x4C, 0x78, 0xA8)) > 0.003  # the histograms were drawn
    # the thumbnails were decoded and drawn: a share of the page has fundus-orange pixels
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    orange = (arr[..., 0] > 120) & (arr[..., 0] > arr[..., 1] + 40) & (arr[..., 1] > arr[..., 2])
    assert orange.mean() > 0.002


def _identifiers(screened: dict) -> set[bytes]:
    import pydicom

    needles: set[bytes] = set()
    files = list((screened["synth"] / "dicom").rglob("*")) + list(screened["misc"].rglob("*"))
    for path in files:
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(kw, "") or "").strip()
            for part in {value, *value.split("^")}:
                if len(part) >= 5:
                    needles.add(part.encode())
    for t in _rows(screened["synth"] / "truth.csv"):
        needles.update({t["patient_id"].encode(), t["accession"].encode()})
    needles.update({b"Zyxwv", b"PID-QX", b"ACCQX"})
    return needles


def test_outputs_outside_private_hold_no_patient_identifier(screened: dict) -> None:
    needles = _identifiers(screened)
    assert len(needles) > 100
    out = screened["out"]
    shared = [p for p in out.iterdir() if p.is_file()]
    assert {p.name for p in shared} == {"results.csv", "summary.json", "report.html"}
    for p in shared:
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, (p.name, needle[:24])
    terminal = (screened["proc"].stdout + screened["proc"].stderr).encode()
    for needle in needles:
        assert needle not in terminal, needle[:24]
    # private/ is owner-only; it is where the way back to the files lives
    assert (out / "private").stat().st_mode & 0o077 == 0
    assert (out / "private" / "source_index.csv").stat().st_mode & 0o077 == 0


def test_options_labels_threshold_language_and_no_thumbnails_by_default(
    screened: dict, tmp_path: Path
) -> None:
    out = tmp_path / "second"
    result = cli(
        "screen",
        "--model",
        screened["ckpt"],
        screened["synth"] / "dicom",
        "-o",
        out,
        "--labels",
        "glaucoma,media_opacity",
        "--labels",
        "retinal_artery_occlusion",
        "--threshold",
        "0.3",
        "--threshold",
        "media_opacity=0.9",
        "--lang",
        "zh",
        "--workers",
        "0",
    )
    assert "images flagged" in result.stdout
    rows = _rows(out / "results.csv")
    assert len(rows) == N_EXPORT
    assert [c for c in rows[0] if c.startswith("p_")] == [
        "p_glaucoma",
        "p_retinal_artery_occlusion",
        "p_media_opacity",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["language"] == "zh"
    assert summary["thresholds"] == {"glaucoma": 0.3, "retinal_artery_occlusion": 0.3, "media_opacity": 0.9}
    assert summary["threshold_sources"]["media_opacity"] == "cli-label"
    for r in rows:
        flagged = set(filter(None, r["flagged"].split(";")))
        assert flagged == {
            lab for lab, t in summary["thresholds"].items() if float(r[f"p_{lab}"]) >= t - 5e-5
        }
    assert "data:image/jpeg" not in (out / "report.html").read_text(encoding="utf-8")


def test_nothing_screenable_is_a_one_line_error(screened: dict, tmp_path: Path) -> None:
    bad = tmp_path / "only_bad"
    bad.mkdir()
    (bad / "a.txt").write_text("not an image")
    write_dicom(bad / "ct.dcm", "ct", identity(300))
    result = cli("screen", "--model", screened["ckpt"], bad, "-o", tmp_path / "o", "--workers", "0", code=2)
    message = result.stderr.strip()
    assert "no image could be screened" in message and "rejected.csv" in message
    assert len(message.splitlines()) <= 2  # one line (rich may wrap a long path)
    assert {r["reason"] for r in _rows(tmp_path / "o" / "private" / "rejected.csv")} == {
        "not_dicom",
        "wrong_modality",
    }
    for args, text in (
        (("--labels", "glaucomaa"), "unknown label"),
        (("--threshold", "2"), "between 0 and 1"),
        (("--lang", "fr"), "language"),
    ):
        r = cli("screen", "--model", screened["ckpt"], screened["misc"], "-o", tmp_path / "x", *args, code=2)
        assert text in r.stderr
    r = cli("screen", "--model", screened["ckpt"], tmp_path / "missing", "-o", tmp_path / "y", code=2)
    assert "does not exist" in r.stderr
    r = cli("screen", "--model", tmp_path / "nope.pt", bad, "-o", tmp_path / "z", code=2)
    assert "does not exist" in r.stderr


def test_thumbnail_payload_is_a_real_jpeg(screened: dict) -> None:
    import base64
    import re

    page = (screened["out"] / "report.html").read_text(encoding="utf-8")
    payload = re.search(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page).group(1)
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert img.format == "JPEG" and max(img.size) <= 160
