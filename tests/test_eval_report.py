"""Evaluation reports (JSON + self-contained HTML) and the `vilref-client eval` / `synth` commands."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from client.cli import app
from vilref_fed.eval.metrics import multilabel_metrics
from vilref_fed.eval.report import write_eval_report
from vilref_fed.model import build_model, save_checkpoint
from vilref_fed.ontology import load_ontology

runner = CliRunner()


def _result():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < 0.3).astype(float)
    y[:, 2] = 0  # a label without positives: NaN AUC, must become null in JSON and n/a in HTML
    s = rng.random((60, 3)) * 0.6 + 0.4 * y
    r = multilabel_metrics(y, s, ["glaucoma", "media_opacity", "macular_hole"])
    r.update({"label_ids": ["glaucoma", "media_opacity", "macular_hole"], "y_true": y, "scores": s})
    return r


def test_report_json_and_self_contained_html(tmp_path):
    json_path, html_path = write_eval_report(
        tmp_path, _result(), title="Test report", settings={"lang": "en"}
    )
    data = json.loads(json_path.read_text())
    assert data["per_label"]["macular_hole"]["auc"] is None
    assert data["n_labels_evaluated"] == 2 and data["settings"] == {"lang": "en"}
    assert "y_true" not in data
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is loaded from anywhere: no external src/href at all.
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 2  # AUC bars + ROC small multiples
    for b64 in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100
    for label in ("glaucoma", "media_opacity", "macular_hole"):
        assert f"<td>{label}</td>" in page
    assert "n/a" in page


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model("tiny")
    path = save_checkpoint(
        d / "tiny.pt", model, {"ontology_hash": load_ontology().hash, "prompt_language": "en"}
    )
    return path


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "site"
    res = runner.invoke(app, ["synth", "--out", str(d), "--n", "30", "--profile", "balanced", "--seed", "2"])
    assert res.exit_code == 0, res.output
    return d


def test_synth_command_writes_a_site(synth_dir):
    assert (synth_dir / "reports.csv").is_file() and len(list((synth_dir / "images").glob("*.png"))) == 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "5", "--profile", "nowhere"], "unknown profile"),
        (["--n", "0"], "--n must be at least 1"),
    ],
)
def test_synth_command_bad_input(tmp_path, args, message):
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_eval_zeroshot_command(tmp_path, checkpoint, synth_dir):
    out = tmp_path / "rep"
    res = runner.invoke(
        app,
        [
            "eval",
            "zeroshot",
            "--model",
            str(checkpoint),
            "--data",
            str(synth_dir),
            "-o",
            str(out),
            "--min-positives",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "zeroshot.json").read_text())
    assert data["settings"]["prompt_language"] == "en" and data["n_samples"] == 30
    assert "macro AUC" in res.output
    assert (out / "zeroshot.html").read_text().count("data:image/png;base64,") == 2


def test_eval_linear_probe_command(tmp_path, checkpoint, synth_dir):
    out = tmp_path / "lp"
    res = runner.invoke(
        app,
        [
            "eval",
            "linear-probe",
            "--model",
            str(checkpoint),
            "--data",
            str(synth_dir),
            "--test",
            str(synth_dir),
            "-o",
            str(out),
            "--labels",
            "normal,glaucoma",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "linear_probe.json").read_text())
    assert list(data["per_label"]) == ["normal", "glaucoma"]


@pytest.mark.parametrize(
    "which, message",
    [
        ("missing_model", "does not exist"),
        ("not_a_model", "not a readable vilref-fed model checkpoint"),
        ("bad_data", "neither truth.csv"),
        ("bad_label", "unknown label"),
        ("bad_lang", "--lang must be en or zh"),
    ],
)
def test_eval_command_bad_input_is_one_line(tmp_path, checkpoint, synth_dir, which, message):
    model, data, extra = str(checkpoint), str(synth_dir), []
    if which == "missing_model":
        model = str(tmp_path / "nope.pt")
    elif which == "not_a_model":
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        model = str(tmp_path / "junk.pt")
    elif which == "bad_data":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif which == "bad_label":
        extra = ["--labels", "glaucoma,unicorns"]
    else:
        extra = ["--lang", "fr"]
    res = runner.invoke(
        app, ["eval", "zeroshot", "--model", model, "--data", data, "-o", str(tmp_path / "o"), *extra]
    )
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
