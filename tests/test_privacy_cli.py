"""`vilref-client train-head` on a real site: synthetic DICOM exports and reports, ingested with the
real `init` + `ingest` commands, then a head trained with and without patient-level DP."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from client.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from vilref_fed.data.synthetic import generate_site

    root = tmp_path_factory.mktemp("privacy_cli")
    generate_site(root / "synth", n=36, profile="urban-dr", seed=11, dicom=True)
    site_dir = root / "site"
    r = runner.invoke(app, ["init", "--site-dir", str(site_dir), "--name", "hospital-a",
                            "--image-size", "64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ingest", "--site-dir", str(site_dir), "--dicom", str(root / "synth" / "dicom"),
                            "--reports", str(root / "synth" / "reports.csv")])
    assert r.exit_code == 0, r.output
    return site_dir


def _json(output: str) -> dict:
    line = [x for x in output.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def test_train_head_with_patient_level_dp_reports_epsilon(site, tmp_path):
    out = tmp_path / "head.pt"
    r = runner.invoke(app, ["train-head", "--site-dir", str(site), "--model", "tiny", "--epochs", "3",
                            "--batch-size", "8", "--dp", "--epsilon", "2.5", "--delta", "1e-4",
                            "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = _json(r.stdout)
    assert m["epsilon"] == pytest.approx(2.5, rel=0.02) and m["delta"] == 1e-4
    assert m["privacy_unit"] == "patient" and m["units"] < m["images"]  # patients with two eyes
    saved = torch.load(out, weights_only=True)
    assert saved["kind"] == "vilref-head"
    assert saved["meta"]["metrics"]["epsilon"] == pytest.approx(m["epsilon"])
    assert len(saved["meta"]["label_ids"]) == 19 and saved["meta"]["config"]["dp"]["epsilon"] == 2.5


def test_train_head_without_dp_says_so(site):
    r = runner.invoke(app, ["train-head", "--site-dir", str(site), "--model", "tiny", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "no differential privacy" in r.stdout
    assert (site / "heads" / "head-frozen.pt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny", "--epsilon", "3"], "only apply with --dp"),
        (["--model", "tiny", "--dp"], "exactly one of --epsilon E or --noise-multiplier"),
        (["--model", "tiny", "--dp", "--epsilon", "1", "--noise-multiplier", "1"], "exactly one of"),
        (["--model", "tiny", "--mode", "lora"], "head mode must be one of"),
        (["--model", "tiny", "--dp", "--epsilon", "-1"], "epsilon must be a positive"),
        ([], "--checkpoint model.pt"),
        (["--checkpoint", "/nonexistent/model.pt"], "does not exist"),
        (["--model", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(site, args, message):
    r = runner.invoke(app, ["train-head", "--site-dir", str(site), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output.replace("\n", " ")
    assert "Traceback" not in r.output


def test_not_a_site(tmp_path):
    r = runner.invoke(app, ["train-head", "--site-dir", str(tmp_path / "nowhere"), "--model", "tiny"])
    assert r.exit_code == 2 and "is not a site" in r.output.replace("\n", " ")
