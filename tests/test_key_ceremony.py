"""The key ceremony: a hospital's node key is created, registered, used in a real round, rotated or
revoked — and a revoked or retired key is refused afterwards. Certificate expiry is checked at start
with a warning 30 days ahead.

The end-to-end part shares one federation scenario with tests/test_deploy_units_e2e.py
(tests/deploy_scenario.py: the runbook's commands and the units' ExecStart lines on loopback); the
rest are fast checks of the commands themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from deploy_scenario import FINGERPRINT, REFUSED_TEXT, run_cli, scenario

# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    return scenario(tmp_path_factory)


def _round_sites(status: dict, round_no: int = 1) -> dict[str, str]:
    r = [x for x in status["rounds"] if x["round"] == round_no][0]
    return {s["site"]: s["status"] for s in r["sites"]}


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_site_key_created_at_the_hospital_and_registered_by_fingerprint(sc):
    for name in ("site-a", "site-b"):
        fp = sc["fingerprints"][name]
        assert len(fp["hospital"]) == 1 and fp["hospital"] == fp["coordinator"], fp  # the phone check
    # The CA fingerprint the hospital checks (keys show --ca) is the one the coordinator reads out.
    from vilref_fed.security import certificate_info

    ca = certificate_info(sc["consortium"] / "pki" / "ca.crt").fingerprint_sha256
    assert ca in sc["cli"]["pki_show"].flat
    assert all(ca in sc["fingerprints"][n]["show"] for n in ("site-a", "site-b"))


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_only_public_keys_reached_the_coordinator(sc):
    inbox = sc["root"] / "coordinator-inbox"
    sent = sorted(p.name for p in inbox.iterdir())
    assert sent == ["site-a.pub", "site-b.pub"]
    for p in [*inbox.iterdir(), *(sc["consortium"] / "sites").iterdir()]:
        text = p.read_text(encoding="utf-8")
        assert text.startswith("ecdsa-sha2-nistp384 ") and "PRIVATE" not in text, p
    for name in ("site-a", "site-b"):
        key = Path(sc["site_vars"][name]["VILREF_SITE_DIR"]) / "keys" / "node_key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_registered_key_used_in_a_round(sc):
    assert _round_sites(sc["after_stop"]) == {"site-a": "accepted", "site-b": "accepted"}


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_revoked_site_is_refused(sc):
    assert "site-b removed" in sc["cli"]["remove_site"].flat
    listed = {s["name"]: s["status"] for s in json.loads(sc["cli"]["sites_after_revocation"].output)}
    assert listed == {"site-a": "active", "site-b": "removed"}
    # At the next start the coordinator unregistered site-b's key from the SuperLink ...
    unreg = [e for e in sc["events"] if e["kind"] == "site-unregistered" and e["site"] == "site-b"]
    assert unreg, sc["events"]
    # ... and site-b's service (same unit, same key) was refused: Flower would not activate it.
    assert REFUSED_TEXT in sc["revoked"]["join_output"]
    assert "Failed to activate SuperNode" in sc["revoked"]["supernode_log"]
    # The run went on without it: the resumed round waited for site-a alone.
    assert "round 2: all 1 sites online" in sc["coordinator_log"]


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_rotated_key_joins_and_the_retired_key_is_refused(sc):
    rot = sc["rotation"]
    old_fp = FINGERPRINT.findall(rot["replace"])[0]
    new_fp = FINGERPRINT.findall(rot["replace"])[1]
    assert old_fp == sc["fingerprints"]["site-a"]["hospital"][0] and new_fp != old_fp
    assert new_fp in rot["rotate"]
    assert (rot["old_keys"] / "node_key").exists()
    retired = list(
        (Path(sc["site_vars"]["site-a"]["VILREF_SITE_DIR"]) / "keys" / "retired").glob("*/node_key")
    )
    assert len(retired) == 1 and retired[0].read_bytes() == (rot["old_keys"] / "node_key").read_bytes()
    # site-a came back online with its new key (its old one was unregistered, see below) ...
    assert "round 2: all 1 sites online" in sc["coordinator_log"]
    # ... while a copy of site-a holding the retired key was refused (join gives up with code 3).
    stolen = sc["stolen_key"]
    assert stolen["rc"] == 3, stolen["output"]
    assert "not registered" in stolen["output"]
    assert "Failed to activate SuperNode" in stolen["supernode_log"]
    orphan = [e for e in sc["events"] if e["kind"] == "site-unregistered" and "replaced key" in e["message"]]
    assert orphan, sc["events"]


# ------------------------------------------------------------------------- commands, no federation
@pytest.fixture()
def site_dir(tmp_path: Path) -> Path:
    from vilref_fed.data.site import init_site

    init_site(tmp_path / "site", "st-mary", image_size=48).close()
    return tmp_path / "site"


def _ca(tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime, name: str = "ca.crt") -> Path:
    """A CA certificate with the given validity window (to exercise expiry without waiting)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test consortium CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / name
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_keys_create_is_idempotent_and_keeps_the_private_key_private(site_dir: Path, tmp_path: Path):
    first = run_cli(
        ["vilref-client", "keys", "create", "--site-dir", str(site_dir), "--out", str(tmp_path / "x.pub")]
    )
    assert first.exit_code == 0, first.output
    priv = site_dir / "keys" / "node_key"
    before = priv.read_bytes()
    second = run_cli(["vilref-client", "keys", "create", "--site-dir", str(site_dir)])
    assert second.exit_code == 0 and priv.read_bytes() == before  # never replaced silently
    assert FINGERPRINT.findall(first.flat) == FINGERPRINT.findall(second.flat)
    assert "Created" in first.output and "Created" not in second.output
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (tmp_path / "x.pub").read_text() == (site_dir / "keys" / "node_key.pub").read_text()
    assert "PRIVATE" not in first.output + second.output


def test_keys_rotate_retires_the_old_pair_and_makes_a_new_one(site_dir: Path):
    run_cli(["vilref-client", "keys", "create", "--site-dir", str(site_dir)])
    old = (site_dir / "keys" / "node_key").read_bytes()
    res = run_cli(["vilref-client", "keys", "rotate", "--site-dir", str(site_dir)])
    assert res.exit_code == 0, res.output
    retired = list((site_dir / "keys" / "retired").glob("*/node_key"))
    assert len(retired) == 1 and retired[0].read_bytes() == old
    assert (site_dir / "keys" / "node_key").read_bytes() != old
    assert "pki replace-site-key st-mary" in res.flat
    assert stat.S_IMODE((site_dir / "keys" / "retired").stat().st_mode) == 0o700


def test_key_commands_fail_with_one_line_when_there_is_no_key(site_dir: Path, tmp_path: Path):
    for argv in (
        ["vilref-client", "keys", "show", "--site-dir", str(site_dir)],
        ["vilref-client", "keys", "rotate", "--site-dir", str(site_dir)],
        ["vilref-client", "keys", "create", "--site-dir", str(tmp_path / "nowhere")],
    ):
        res = run_cli(argv)
        assert res.exit_code == 2 and res.output.startswith("error:"), res.output
        assert "Traceback" not in res.output


def test_expiry_warns_30_days_ahead_and_refuses_an_expired_certificate(tmp_path: Path):
    from vilref_fed.security import CertificateExpiredError
    from vilref_fed.security.expiry import CertificateCheck, check_certificates, expiry_warnings

    now = _now()
    ca = _ca(tmp_path, now - dt.timedelta(days=1), now + dt.timedelta(days=365))
    checks = [CertificateCheck("consortium CA certificate", ca, "do X")]
    assert expiry_warnings(checks, now=now + dt.timedelta(days=300)) == []  # 65 days left
    assert expiry_warnings(checks, now=now + dt.timedelta(days=334)) == []  # 31 days left
    (warning,) = expiry_warnings(checks, now=now + dt.timedelta(days=336))  # 29 days left
    assert f"{ca}" in warning and "expires in 29 days" in warning and "do X" in warning
    assert check_certificates(checks, now=now + dt.timedelta(days=336))[0].days_left < 30
    with pytest.raises(CertificateExpiredError, match="expired"):
        expiry_warnings(checks, now=now + dt.timedelta(days=366))
    with pytest.raises(CertificateExpiredError, match="clock"):
        expiry_warnings(checks, now=now - dt.timedelta(days=2))


@pytest.fixture()
def consortium(tmp_path: Path) -> Path:
    c = tmp_path / "consortium"
    res = run_cli(["vilref-server", "init", "--dir", str(c), "--host", "127.0.0.1", "--min-sites", "1"])
    assert res.exit_code == 0, res.output
    return c


def test_pki_show_warns_before_and_fails_after_expiry(consortium: Path, tmp_path: Path):
    from vilref_fed.security import issue_server_certificate

    pki = consortium / "pki"
    ok = run_cli(["vilref-server", "pki", "show", "--dir", str(consortium), "--json"])
    assert ok.exit_code == 0 and "warning" not in ok.output.replace('"warning": null', "")
    issue_server_certificate(pki / "ca.crt", pki / "ca.key", pki / "server.crt", pki / "server.key",
                             hosts=["127.0.0.1"], days=20, overwrite=True)  # fmt: skip
    soon = run_cli(["vilref-server", "pki", "show", "--dir", str(consortium)])
    assert soon.exit_code == 0
    assert "warning: the server certificate" in soon.flat and "--renew-server-cert" in soon.flat
    data = json.loads(run_cli(["vilref-server", "pki", "show", "--dir", str(consortium), "--json"]).output)
    server = [c for c in data["certificates"] if c["certificate"] == "server certificate"][0]
    assert 19 <= server["days_left"] <= 20 and "expires in" in server["warning"]
    # The renewal the warning names clears it.
    renewed = run_cli(["vilref-server", "init", "--dir", str(consortium), "--renew-server-cert"])
    assert renewed.exit_code == 0, renewed.output
    assert "warning" not in run_cli(["vilref-server", "pki", "show", "--dir", str(consortium)]).flat
    # An expired CA: exit code 1 with the reason (what a monitoring job looks for).
    now = _now()
    _ca(pki, now - dt.timedelta(days=30), now - dt.timedelta(days=1), name="ca.crt")
    expired = run_cli(["vilref-server", "pki", "show", "--dir", str(consortium)])
    assert expired.exit_code == 1 and "expired on" in expired.flat, expired.output


def test_replace_site_key_refuses_the_same_key_and_unknown_sites(consortium: Path, site_dir: Path):
    run_cli(["vilref-client", "keys", "create", "--site-dir", str(site_dir)])
    pub = str(site_dir / "keys" / "node_key.pub")
    assert (
        run_cli(
            ["vilref-server", "add-site", "st-mary", "--public-key", pub, "--dir", str(consortium)]
        ).exit_code
        == 0
    )
    same = run_cli(
        ["vilref-server", "pki", "replace-site-key", "st-mary", "--public-key", pub, "--dir", str(consortium)]
    )
    assert same.exit_code == 2 and "already registered" in same.flat and "keys rotate" in same.flat
    other = run_cli(
        ["vilref-server", "pki", "replace-site-key", "nobody", "--public-key", pub, "--dir", str(consortium)]
    )
    assert other.exit_code == 2 and "no active site named 'nobody'" in other.flat
    bad = site_dir / "bad.pub"
    bad.write_text("ssh-ed25519 AAAA not-a-key\n")
    garbled = run_cli(
        [
            "vilref-server",
            "pki",
            "replace-site-key",
            "st-mary",
            "--public-key",
            str(bad),
            "--dir",
            str(consortium),
        ]
    )
    assert garbled.exit_code == 2
    listed = json.loads(run_cli(["vilref-server", "sites", "--dir", str(consortium), "--json"]).output)
    assert [s["name"] for s in listed] == ["st-mary"]  # nothing was removed by the failed attempts
    run_cli(["vilref-client", "keys", "rotate", "--site-dir", str(site_dir)])
    new = run_cli(
        ["vilref-server", "pki", "replace-site-key", "st-mary", "--public-key", pub, "--dir", str(consortium)]
    )
    assert new.exit_code == 0, new.output
    listed = json.loads(run_cli(["vilref-server", "sites", "--dir", str(consortium), "--json"]).output)
    assert listed[0]["fingerprint"] == FINGERPRINT.findall(new.flat)[1]


def test_join_refuses_an_expired_or_future_ca_before_connecting(site_dir: Path, tmp_path: Path):
    now = _now()
    for window, reason in (
        ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)), "expired on"),
        ((now + dt.timedelta(days=1), now + dt.timedelta(days=30)), "check this machine's clock"),
    ):
        ca = _ca(tmp_path, *window)
        res = run_cli(
            ["vilref-client", "join", "--site-dir", str(site_dir), "--server", "127.0.0.1:9", "--ca", str(ca)]
        )
        assert res.exit_code == 2 and reason in res.flat, res.output
        assert not (site_dir / "logs" / "supernode.log").exists()  # no SuperNode was started


def test_join_warns_30_days_before_the_ca_expires(site_dir: Path, tmp_path: Path):
    """A real `vilref-client join` process: the warning comes before it starts trying to connect."""
    from server.processes import ManagedProcess, free_port

    now = _now()
    ca = _ca(tmp_path, now - dt.timedelta(days=700), now + dt.timedelta(days=10))
    log = tmp_path / "join.log"
    argv = [str(Path(sys.executable).parent / "vilref-client"), "join", "--site-dir", str(site_dir),
            "--server", f"127.0.0.1:{free_port()}", "--ca", str(ca)]  # fmt: skip
    proc = ManagedProcess("join", argv, log, env={**os.environ, "COLUMNS": "250"}).start()
    try:
        deadline = time.monotonic() + 120
        while (
            "joining" not in log.read_text(errors="replace") and time.monotonic() < deadline and proc.alive()
        ):
            time.sleep(0.3)
        text = " ".join(log.read_text(errors="replace").split())
    finally:
        proc.stop(timeout=5)
    assert "warning: the consortium CA certificate" in text and "expires in 10 days" in text, text
    assert "joining" in text  # a warning, not a refusal
