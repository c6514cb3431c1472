"""Consortium PKI and node keys: real certificates, real TLS handshakes, Flower's own key loaders."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vilref_fed.security import (
    CertificateExpiredError,
    PKIError,
    certificate_info,
    check_certificate_validity,
    create_ca,
    ensure_node_key,
    issue_server_certificate,
    load_node_public_key,
    verify_signed_by,
)


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    p = {k: tmp_path / f"{k}.pem" for k in ("ca", "ca_key", "srv", "srv_key")}
    create_ca(p["ca"], p["ca_key"])
    issue_server_certificate(
        p["ca"], p["ca_key"], p["srv"], p["srv_key"], hosts=["fl.example.org", "127.0.0.1"]
    )
    return p


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_server_certificate(pki):
    info = certificate_info(pki["srv"])
    assert set(info.sans) == {"fl.example.org", "127.0.0.1"}
    verify_signed_by(pki["srv"], pki["ca"])
    assert _mode(pki["ca_key"]) == 0o600 and _mode(pki["srv_key"]) == 0o600
    assert 800 < check_certificate_validity(pki["srv"]) <= 826
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", pki["ca"], pki["srv"]], capture_output=True, text=True
        )
        assert out.returncode == 0 and "OK" in out.stdout


def test_foreign_certificate_is_not_signed_by_our_ca(pki, tmp_path):
    create_ca(tmp_path / "other.pem", tmp_path / "other.key")
    with pytest.raises(PKIError):
        verify_signed_by(pki["srv"], tmp_path / "other.pem")


def test_private_keys_are_never_overwritten(pki):
    with pytest.raises(PKIError, match="refusing to overwrite"):
        create_ca(pki["ca"], pki["ca_key"])


@pytest.mark.parametrize("bad", ["has space", "http://x", "a/b"])
def test_bad_host_names_are_refused(pki, tmp_path, bad):
    with pytest.raises(PKIError):
        issue_server_certificate(
            pki["ca"], pki["ca_key"], tmp_path / "s.pem", tmp_path / "s.key", hosts=[bad]
        )


def test_expiry_and_not_yet_valid_are_reported(pki):
    info = certificate_info(pki["srv"])
    with pytest.raises(CertificateExpiredError, match="expired"):
        check_certificate_validity(pki["srv"], now=info.not_after + dt.timedelta(seconds=1))
    with pytest.raises(CertificateExpiredError, match="clock"):
        check_certificate_validity(pki["srv"], now=info.not_before - dt.timedelta(days=1))


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        with srv:
            srv.settimeout(10)
            for _ in range(3):
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True) as s:
                        s.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


def _handshake(port: int, ca: Path, server_hostname: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            return s.recv(2)


def test_real_tls_handshake_checks_chain_and_san(pki, tmp_path):
    create_ca(tmp_path / "other.pem", tmp_path / "other.key")
    port, t = _tls_server(pki["srv"], pki["srv_key"])
    assert _handshake(port, pki["ca"], "fl.example.org") == b"ok"  # a SAN, our CA: accepted
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, pki["ca"], "evil.example.org")  # not a SAN
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, tmp_path / "other.pem", "fl.example.org")  # another CA
    t.join(timeout=10)


def test_node_key_created_once_and_reused(tmp_path):
    first = ensure_node_key(tmp_path / "keys", comment="vilref-site-a")
    assert first.created and _mode(first.private_path) == 0o600
    again = ensure_node_key(tmp_path / "keys")
    assert not again.created and again.fingerprint == first.fingerprint
    key = load_node_public_key(first.public_path)
    assert isinstance(key.curve, ec.SECP384R1)
    assert first.public_openssh.startswith("ecdsa-sha2-nistp384 ")
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-lf", first.public_path], capture_output=True, text=True)
        assert first.fingerprint in out.stdout


def test_flower_accepts_our_node_keys(tmp_path):
    """The same loaders `flwr supernode register` and `flower-supernode` use."""
    from flwr.cli.supernode.register import try_load_public_key

    pair = ensure_node_key(tmp_path / "keys")
    assert try_load_public_key(pair.public_path)
    priv = serialization.load_ssh_private_key(pair.private_path.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey)


def _write_pub(path: Path, key) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path


def test_non_ecdsa_or_garbage_public_keys_are_refused(tmp_path):
    rsa_pub = _write_pub(tmp_path / "rsa.pub", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ed_pub = _write_pub(tmp_path / "ed.pub", ed25519.Ed25519PrivateKey.generate())
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\n")
    for p in (rsa_pub, ed_pub):
        with pytest.raises(PKIError, match="NIST"):
            load_node_public_key(p)
    with pytest.raises(PKIError, match="OpenSSH public key"):
        load_node_public_key(junk)
    with pytest.raises(PKIError, match="not found"):
        load_node_public_key(tmp_path / "missing.pub")
