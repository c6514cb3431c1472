"""The screening report page: self-contained, escaped, thumbnails only on request, renders in Chromium."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vilref_fed.eval.screen_report import build_report_html, thumbnail_jpeg, write_report

LABELS = ["normal", "diabetic_retinopathy", "glaucoma", "macular_edema", "laser_scars"]
NAMES = {
    "normal": "Normal fundus",
    "diabetic_retinopathy": "Diabetic retinopathy",
    "glaucoma": "Glaucoma <suspect>",
    "macular_edema": "Macular edema",
    "laser_scars": "Laser scars",
}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _inputs(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = rng.beta(2, 5, size=(n, len(LABELS)))
    thresholds = {
        "normal": 0.5,
        "diabetic_retinopathy": 0.35,
        "glaucoma": 0.4,
        "macular_edema": 0.5,
        "laser_scars": 0.6,
    }
    rows = []
    for i in range(n):
        flagged = [lab for j, lab in enumerate(LABELS) if lab != "normal" and scores[i, j] >= thresholds[lab]]
        rows.append(
            {
                "study_key": f"{i:016x}",
                "image_key": f"{i + 1000:016x}",
                "laterality": "OD" if i % 2 else "OS",
                "abnormality": float(
                    max(scores[i, j] - thresholds[lab] for j, lab in enumerate(LABELS) if j)
                ),
                "flagged": flagged,
                "scores": dict(zip(LABELS, scores[i].tolist(), strict=True)),
            }
        )
    rows.sort(key=lambda r: -r["abnormality"])
    summary = {
        "created": "2026-12-04 12:00 UTC",
        "model": {"name": "tiny", "ontology_hash": "ab" * 32},
        "language": "en",
        "device": "cpu",
        "images_per_s": 123.4,
        "thresholds": thresholds,
        "threshold_sources": {lab: "model" for lab in LABELS} | {"laser_scars": "default"},
        "counts": {
            "files_found": n + 3,
            "images_screened": n,
            "files_rejected": 3,
            "images_flagged": 20,
            "studies_screened": n,
            "studies_flagged": 20,
        },
        "rejected_by_reason": {"not_dicom": 2, "truncated": 1},
        "per_label": {
            lab: {"flagged": sum(lab in r["flagged"] for r in rows), "mean_score": float(scores[:, j].mean())}
            for j, lab in enumerate(LABELS)
        },
    }
    return summary, scores, rows


def test_report_is_self_contained_escaped_and_without_thumbnails_by_default():
    summary, scores, rows = _inputs()
    page = build_report_html(summary, LABELS, NAMES, scores, rows)
    parser = _Collector()
    parser.feed(page)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/png;base64,")
    # nothing is fetched from anywhere: no script, no stylesheet link, no remote URL
    assert not any(t in ("script", "link", "iframe") for t, _ in parser.tags)
    assert "http://" not in page and "https://" not in page
    assert "Glaucoma &lt;suspect&gt;" in page and "<suspect>" not in page
    assert "not_dicom" in page and "default 0.5 (not validated)" in page
    assert rows[0]["study_key"] in page


def test_thumbnails_only_when_given():
    summary, scores, rows = _inputs()
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[16:48, 16:48] = (200, 80, 40)
    thumbs = {rows[0]["image_key"]: thumbnail_jpeg(rgb)}
    page = build_report_html(summary, LABELS, NAMES, scores, rows, thumbs)
    parser = _Collector()
    parser.feed(page)
    jpegs = [a for t, a in parser.tags if t == "img" and a["src"].startswith("data:image/jpeg;base64,")]
    assert len(jpegs) == 1


def test_empty_flag_list_says_so():
    summary, scores, rows = _inputs()
    for r in rows:
        r["flagged"] = []
    page = build_report_html(summary, LABELS, NAMES, scores, rows)
    assert "No image reached a threshold." in page


def chromium_screenshot(html_path: Path, png_path: Path, height: int = 2600) -> Path:
    """Render a page with headless Chromium (no network, throwaway profile) and save a screenshot."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--window-size=1280,{height}",
                f"--screenshot={png_path}",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert png_path.is_file(), "Chromium wrote no screenshot"
    return png_path


def colour_fraction(png_path: Path, rgb: tuple[int, int, int], tol: int = 12) -> float:
    from PIL import Image

    arr = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    return float((np.abs(arr - np.array(rgb)).max(axis=-1) <= tol).mean())


def test_report_renders_in_headless_chromium(tmp_path):
    summary, scores, rows = _inputs()
    page = tmp_path / "report.html"
    write_report(page, build_report_html(summary, LABELS, NAMES, scores, rows))
    shot = chromium_screenshot(page, tmp_path / "report.png")
    # the embedded histogram PNG was decoded and drawn (its bar colour covers part of the page) ...
    assert colour_fraction(shot, (0x4C, 0x78, 0xA8)) > 0.003
    # ... and so were the flagged-finding badges of the ranked table
    assert colour_fraction(shot, (0xFD, 0xE2, 0xE1)) > 0.0005
