"""`vilref-client train` end to end on CPU: a synthetic hospital folder and an ingested site directory."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.cli import app
from vilref_fed.model import load_checkpoint
from vilref_fed.offline import child_env
from vilref_fed.ontology import load_ontology
from vilref_fed.train import TrainConfig

torch.set_num_threads(1)
runner = CliRunner()
CLIENT = str(Path(sys.executable).with_name("vilref-client"))


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from vilref_fed.data.synthetic import generate_site

    out = tmp_path_factory.mktemp("synth") / "myopia"
    generate_site(out, 24, "myopia-clinic", seed=4, dicom=True)
    return out


def test_train_entry_point_on_a_synthetic_folder(synthetic, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(synthetic),
        "--model",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "2",
        "--no-progress",
    ]
    done = subprocess.run(
        [CLIENT, *args], env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "trained 4 steps" in done.stderr

    model, meta = load_checkpoint(out / "model.pt")
    assert model.config.name == "tiny"
    assert meta["ontology_hash"] == load_ontology().hash
    assert meta["prompt_language"] == "zh"  # from the synthetic site's manifest
    assert meta["label_ids"] == list(load_ontology().label_ids)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 4 and metrics["source"] == "synthetic"
    assert TrainConfig.from_toml(out / "train.toml").num_labels == 19
    assert (out / "trainer_checkpoint.pt").is_file()

    # A second run into the same directory must not silently overwrite the first one.
    r = cli(*args, code=2)
    assert "already holds a training run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(*args, "--resume", code=2)
    assert "already finished" in r.stderr


def test_train_resumes_an_unfinished_run_to_its_planned_end(synthetic, tmp_path):
    from vilref_fed.model import build_model
    from vilref_fed.train import LocalTrainer

    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(synthetic),
        "--model",
        "tiny",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        "5",
        "--no-progress",
        "--labels-from",
        "truth",
    ]
    cli(*args)
    assert json.loads((out / "metrics.json").read_text())["train"]["global_step"] == 5
    # Rewind the checkpoint to step 2 of the same 5-step plan (as if the machine had died there).
    ckpt = torch.load(out / "trainer_checkpoint.pt", weights_only=True)
    trainer = LocalTrainer(build_model("tiny"), TrainConfig.from_toml(out / "train.toml"))
    trainer.load_state_dict(ckpt)
    assert trainer.plan_end == 5
    ckpt["counters"]["global_step"] = 2
    torch.save(ckpt, out / "trainer_checkpoint.pt")
    cli(*args, "--resume")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["train"]["global_step"] == 5


def test_train_on_an_ingested_site(synthetic, tmp_path):
    site = tmp_path / "site"
    cli("init", "--site-dir", str(site), "--name", "test-hospital", "--language", "zh", "--image-size", "64")
    cli(
        "ingest",
        "--site-dir",
        str(site),
        "--dicom",
        str(synthetic / "dicom"),
        "--reports",
        str(synthetic / "reports.csv"),
        "--workers",
        "1",
    )
    out = tmp_path / "run"
    r = cli(
        "train",
        "--site-dir",
        str(site),
        "--model",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert "trained 3 steps" in r.stderr
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["prompt_language"] == "zh" and meta["training"]["source"] == "site"
    assert meta["training"]["train_pairs"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one of --site-dir"),
        (["--data", "X", "--site-dir", "Y"], "exactly one of --site-dir"),
        (["--data", "{missing}"], "is not a directory"),
        (["--data", "{synthetic}", "--config", "{missing}"], "does not exist"),
        (["--data", "{synthetic}", "--config", "{bad_toml}"], "unknown keys"),
        (["--data", "{synthetic}", "--objective", "triplet"], "objective must be"),
        (["--data", "{synthetic}", "--resume"], "nothing to resume"),
        (["--data", "{synthetic}", "--init", "{missing}"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_errors(synthetic, tmp_path, extra, message):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n", encoding="utf-8")
    subs = {"{missing}": str(tmp_path / "missing"), "{synthetic}": str(synthetic), "{bad_toml}": str(bad)}
    args = [subs.get(a, a) for a in extra]
    r = cli("train", "--out", str(tmp_path / "out"), "--no-progress", *args, code=2)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_print_config_is_valid_toml_with_the_defaults():
    r = cli("train", "--print-config", "--lr", "0.002")
    parsed = tomllib.loads(r.stdout)["train"]
    assert parsed["lr"] == 0.002 and parsed["queue_size"] == TrainConfig().queue_size
