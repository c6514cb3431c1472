"""The systemd units' ExecStart lines, run exactly as written, reach a completed round.

The commands are taken from deploy/systemd/*.service at test time, with the EnvironmentFile values
pointing at a temporary consortium and two temporary hospital sites, and run as real processes on
loopback with the environment systemd would give them (real SuperLink with TLS and node
authentication, real SuperNodes). If a unit and the CLI drift apart, this fails. The scenario (and
the key ceremony asserted in tests/test_key_ceremony.py) is in tests/deploy_scenario.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_scenario import (
    COORDINATOR_UNIT,
    INSTALL_BIN,
    SITE_UNIT,
    exec_start_argv,
    parse_unit,
    scenario,
)

from vilref_fed.offline import OFFLINE_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    return scenario(tmp_path_factory)


def _sites(status: dict, round_no: int = 1) -> dict[str, str]:
    r = [x for x in status["rounds"] if x["round"] == round_no][0]
    return {s["site"]: s["status"] for s in r["sites"]}


def test_processes_ran_the_units_exec_start_lines_with_the_environment_files(sc):
    coord = parse_unit(COORDINATOR_UNIT)
    site = parse_unit(SITE_UNIT)
    assert sc["argv"]["coordinator"] == exec_start_argv(coord, sc["env"]["coordinator"])
    assert sc["argv"]["coordinator"] == [
        f"{INSTALL_BIN}/vilref-server", "start", "--dir", sc["coord_vars"]["VILREF_CONSORTIUM_DIR"],
        "--no-live", "--resume-if-interrupted",
    ]  # fmt: skip
    for name in ("site-a", "site-b"):
        v = sc["site_vars"][name]
        assert sc["argv"][name] == exec_start_argv(site, sc["env"][name])
        assert sc["argv"][name] == [
            f"{INSTALL_BIN}/vilref-client", "join", "--site-dir", v["VILREF_SITE_DIR"],
            "--server", v["VILREF_SERVER"], "--ca", v["VILREF_CA_CERT"],
        ]  # fmt: skip


def test_units_reach_a_completed_round_with_both_hospitals(sc, record_testsuite_property):
    for label, t in sc["timeline"]:  # seconds since the scenario began, into the JUnit report
        record_testsuite_property(f"deploy-scenario: {label}", t)
    st = sc["after_stop"]
    assert [(r["round"], r["status"]) for r in st["rounds"]][0] == (1, "completed"), st["rounds"]
    assert _sites(st) == {"site-a": "accepted", "site-b": "accepted"}
    r = st["rounds"][0]
    assert r["num_examples"] > 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0


def test_systemctl_stop_interrupts_the_run_and_the_next_start_resumes_it(sc):
    """`systemctl stop` (SIGTERM, KillMode=mixed) ends the coordinator with 130, which the unit's
    SuccessExitStatus= counts as success, and leaves no process behind; the next `systemctl start`
    (--resume-if-interrupted) continues the same run after its last completed round."""
    first, second = sc["coordinator_stop"]
    assert first["rc"] == 130 and second["rc"] == 130, sc["coordinator_stop"]
    assert first["left"] == [] and second["left"] == [] and first["tree"] >= 3
    assert sc["after_stop"]["run"]["status"] == "stopped"
    uid = sc["after_stop"]["run"]["uid"]
    assert sc["final"]["run"]["uid"] == uid  # no new run: the same one continued
    assert any(e["kind"] == "resume-requested" and e["run"] == uid for e in sc["events"])
    r1_before = [x for x in sc["after_stop"]["rounds"] if x["round"] == 1][0]
    r1_after = [x for x in sc["final"]["rounds"] if x["round"] == 1][0]
    assert r1_after == r1_before  # round 1 not repeated
    assert "round 2: all 1 sites online" in sc["coordinator_log"]


def test_every_process_the_units_started_ran_offline(sc):
    """Read from /proc while run 1 went on: the coordinator, SuperLink, its ServerApp helpers, both
    hospitals' join processes, SuperNodes and ClientApps all had telemetry, update checks and model-
    hub access off; the SuperLink never installs dependencies and no SuperNode runs without TLS."""
    procs = [p for service in sc["processes_run1"].values() for p in service.values()]
    assert len(procs) >= 6
    for p in procs:
        for key, value in OFFLINE_ENV.items():
            assert p["env"].get(key) == value, (p["cmdline"][:3], key)
    names = [" ".join(p["cmdline"]) for p in procs]
    kinds = {Path(w).name for p in procs for w in p["cmdline"][:2]}  # [python,] script
    assert {"vilref-server", "vilref-client", "flower-superlink", "flower-supernode"} <= kinds, kinds
    superlinks = [n for n in names if "flower-superlink" in n]
    supernodes = [n for n in names if "flower-supernode" in n]
    assert superlinks and all("--disable-runtime-dependency-installation" in n for n in superlinks)
    assert all("--enable-supernode-auth" in n for n in superlinks)
    assert len(supernodes) >= 2 and all("--insecure" not in n for n in supernodes)
    assert all("--auth-supernode-private-key" in n for n in supernodes)


def test_systemctl_stop_ends_the_hospital_service_cleanly(sc):
    """SIGTERM to the main process only (KillMode=mixed): exit 0 (no SuccessExitStatus needed), and
    its SuperNode tree is gone before systemd would have to kill anything."""
    for stop in [*sc["site_stop"].values(), sc["revoked"]["stop"], sc["site_a_stop_2"]]:
        assert stop["rc"] == 0, stop
        assert stop["left"] == [], stop
    assert all(s["tree"] >= 2 for s in sc["site_stop"].values())  # there was a SuperNode to stop


def test_runbook_status_and_export_work_on_the_units_run(sc):
    import torch

    from server.checkpoints import load_round_checkpoint
    from vilref_fed.model import load_checkpoint, shared_state_dict

    status = sc["cli"]["status"]
    assert status.exit_code == 0, status.output
    assert sc["after_stop"]["run"]["uid"] in status.flat
    model, meta = load_checkpoint(sc["model"])
    assert meta["round"] == 1 and meta["model"] == "tiny" and meta["sites"] == ["site-a", "site-b"]
    ckpt = load_round_checkpoint(sc["consortium"] / "checkpoints" / "round-0001.pt")
    sd = shared_state_dict(model)
    assert set(sd) == set(ckpt["arrays"]) and all(torch.equal(v, ckpt["arrays"][k]) for k, v in sd.items())
