"""The consortium's small PKI: one CA, one server certificate for the coordinator, expiry checks.

Why our own CA instead of a public one: hospitals connect to a coordinator on a private network,
often by IP address, and they must trust exactly one issuer, the consortium, not every public CA.
The CA certificate (never its key) is what each hospital receives and passes to `vilref-client join
--ca`; the server certificate carries every host name and IP the hospitals will dial as SANs,
because TLS verification in Flower checks the SAN, not the common name.

Keys are ECDSA P-256 (fast handshakes, supported by every TLS stack). Private keys are written
with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 825
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


class PKIError(Exception):
    """A certificate or key problem, with a message that says what to do."""


class CertificateExpiredError(PKIError):
    """A certificate is outside its validity window."""


@dataclass(frozen=True)
class CertificateInfo:
    path: Path
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[str, ...]
    fingerprint_sha256: str

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write a secret file with mode 0600 atomically (no window where others can read it)."""
    if path.exists() and not overwrite:
        raise PKIError(f"{path} already exists; refusing to overwrite a private key")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san_entries(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        h = raw.strip()
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if any(c.isspace() for c in h) or "/" in h or ":" in h:
                raise PKIError(
                    f"{h!r} is neither an IP address nor a host name; give e.g. fl.hospital.org"
                ) from None
            out.append(x509.DNSName(h))
    if not out:
        raise PKIError("a server certificate needs at least one host name or IP address")
    return out


def create_ca(
    cert_path: Path,
    key_path: Path,
    common_name: str = "vilref-fed consortium CA",
    days: int = DEFAULT_CA_DAYS,
) -> x509.Certificate:
    """A self-signed CA that may sign only end-entity certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name, "vilref-fed")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PKIError(f"certificate {path} not found") from None
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"private key {path} not found") from None
    except (ValueError, TypeError):
        raise PKIError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an EC private key")
    return key


def issue_server_certificate(
    ca_cert_path: Path,
    ca_key_path: Path,
    cert_path: Path,
    key_path: Path,
    hosts: list[str] | tuple[str, ...] = DEFAULT_SERVER_HOSTS,
    days: int = DEFAULT_SERVER_DAYS,
    overwrite: bool = False,
) -> x509.Certificate:
    """A TLS server certificate for the coordinator, signed by the consortium CA, SANs = `hosts`."""
    ca_cert = load_certificate(ca_cert_path)
    ca_key = load_private_key(ca_key_path)
    sans = _san_entries(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first), "vilref-fed coordinator"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,  # type: ignore[arg-type]
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key), overwrite=overwrite)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def certificate_info(path: Path) -> CertificateInfo:
    cert = load_certificate(path)
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(v) for v in san_ext.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in san_ext.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        sans = ()
    return CertificateInfo(
        path=Path(path),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sans=sans,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def check_certificate_validity(path: Path, warn_days: float = 30.0, now: dt.datetime | None = None) -> float:
    """Days of validity left; raises CertificateExpiredError outside the window.

    Called before the SuperLink starts: an expired certificate otherwise shows up only as opaque
    TLS handshake failures on every hospital's side.
    """
    info = certificate_info(path)
    now = now or _now()
    if now < info.not_before:
        raise CertificateExpiredError(
            f"certificate {path} is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock"
        )
    if now >= info.not_after:
        raise CertificateExpiredError(
            f"certificate {path} expired on {info.not_after:%Y-%m-%d}; "
            "renew it with `vilref-server init --dir DIR --renew-server-cert`"
        )
    return info.days_left(now)


def verify_signed_by(cert_path: Path, ca_cert_path: Path) -> None:
    """Raise PKIError unless `cert_path` was issued and signed by the CA at `ca_cert_path`."""
    cert = load_certificate(cert_path)
    ca = load_certificate(ca_cert_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as err:
        raise PKIError(f"{cert_path} was not issued by the CA in {ca_cert_path}: {err}") from None
    except Exception as err:  # InvalidSignature
        raise PKIError(f"{cert_path} has an invalid signature for the CA in {ca_cert_path}") from err
