"""End to end with real processes: a coordinator (`vilref-server start`: SuperLink with TLS and node
authentication) and hospitals (`vilref-client join`: SuperNodes) on loopback, through the
federation's LocalCluster. Sites are real: synthetic DICOM exports ingested with the real pipeline.

1. Federated WSCL pre-training with site-level DP: every round's epsilon is recorded in the
   coordinator database and shown by `vilref-server status`.
2. A federated supervised head with patient-level DP (Opacus) at every site: each site reports its
   own cumulative epsilon.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _make_site(root: Path, name: str, profile: str, seed: int, n: int = 24) -> Path:
    from vilref_fed.data.ingest import IngestOptions, ingest
    from vilref_fed.data.site import init_site
    from vilref_fed.data.synthetic import generate_site

    synth = root / f"synth-{name}"
    generate_site(synth, n=n, profile=profile, seed=seed, dicom=True)
    site = init_site(root / name, name=name, image_size=64)
    try:
        ingest(site, IngestOptions(dicom=[synth / "dicom"], reports=[synth / "reports.csv"], workers=1))
    finally:
        site.close()
    return root / name


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("privacy_e2e_sites")
    return [_make_site(root, "hospital-a", "urban-dr", 21),
            _make_site(root, "hospital-b", "glaucoma-center", 22)]


def _cluster(workdir: Path, sites: list[Path], run: dict | None = None, train: dict | None = None, **kw):
    from server.local_cluster import LocalCluster

    return LocalCluster(
        workdir, sites, rounds=2, model="tiny", min_sites=2, local_epochs=0, local_steps=2,
        train=train or {"batch_size": 8, "queue_size": 32},
        sites={"wait_for_sites_s": 300.0, "straggler_grace_s": 60.0},
        run={"eval_every": 0, **(run or {})}, env={"OMP_NUM_THREADS": "1"}, **kw,
    )  # fmt: skip


def test_federated_pretraining_with_site_level_dp_records_epsilon_per_round(two_sites, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app as server_app
    from server.db import CoordinatorDB
    from server.privacy import load_round_privacy
    from vilref_fed.privacy.accounting import site_level_epsilon

    privacy = {"mode": "site-server-fixed", "noise-multiplier": 1.2, "clipping-norm": 5.0, "delta": 1e-5}
    with _cluster(tmp_path, two_sites, privacy=privacy) as cluster:
        cluster.start_sites()
        cluster.start_coordinator()
        status = cluster.wait_finished(timeout=900)
    assert status["run"]["status"] == "completed", status["run"]
    assert [r["status"] for r in status["rounds"]] == ["completed", "completed"]

    db = CoordinatorDB(cluster.consortium.database_url())
    try:
        rows = load_round_privacy(db.engine, status["run"]["uid"])
    finally:
        db.close()
    assert [r.server_round for r in rows] == [1, 2]
    for k, r in enumerate(rows, start=1):
        assert r.released and r.unit == "site" and r.delta == 1e-5
        assert r.noise_multiplier == 1.2 and r.clipping_norm == 5.0
        assert r.sites_aggregated == 2 and "server-side fixed clipping" in r.mechanism
        assert r.epsilon_cumulative == pytest.approx(site_level_epsilon(1.2, k, 1e-5))
    assert rows[1].epsilon_cumulative > rows[0].epsilon_cumulative

    out = CliRunner().invoke(server_app, ["status", "--dir", str(cluster.consortium.root)])
    assert out.exit_code == 0, out.output
    text = out.output.replace("\n", " ")
    assert "epsilon = " in text and "2 released round(s)" in text and "round 2: released" in text

    # The exported global model loads (the noise did not corrupt it).
    model_path = cluster.export(tmp_path / "global.pt")
    from vilref_fed.model import load_checkpoint

    model, _meta = load_checkpoint(model_path)
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


def test_federated_head_with_patient_level_dp_reports_epsilon_per_site(two_sites, tmp_path):
    """task = "head": each site trains the supervised head with Opacus (train_head_round) and replies
    with its cumulative epsilon; the coordinator records it per site and round."""
    privacy = {"patient-dp": True, "patient-epsilon": 4.0, "patient-delta": 1e-4, "max-grad-norm": 1.0}
    head = {"batch_size": 8, "epochs": 3, "lr": 0.5}
    with _cluster(tmp_path, two_sites, run={"task": "head"}, train=head, privacy=privacy) as cluster:
        cluster.start_sites()
        cluster.start_coordinator()
        status = cluster.wait_finished(timeout=900)
    assert status["run"]["status"] == "completed", status["run"]
    assert len(status["rounds"]) == 2
    per_site: dict[str, list[float]] = {}
    for r in status["rounds"]:
        for s in r["sites"]:
            assert s["status"] == "accepted"
            assert s["metrics"]["delta"] == pytest.approx(1e-4)
            per_site.setdefault(s["site"], []).append(s["metrics"]["epsilon"])
    assert set(per_site) == {"hospital-a", "hospital-b"}
    for eps in per_site.values():
        assert 0 < eps[0] < eps[1] <= 4.0 * 1.01  # cumulative per site, within the run's budget
