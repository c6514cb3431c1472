"""Consortium PKI (CA, coordinator TLS certificate, expiry checks) and hospital node keys."""

from vilref_fed.security.node_keys import (
    NodeKeyPair,
    ensure_node_key,
    fingerprint,
    load_node_public_key,
    public_key_openssh,
)
from vilref_fed.security.pki import (
    CertificateExpiredError,
    CertificateInfo,
    PKIError,
    certificate_info,
    check_certificate_validity,
    create_ca,
    issue_server_certificate,
    verify_signed_by,
)

__all__ = [
    "CertificateExpiredError",
    "CertificateInfo",
    "NodeKeyPair",
    "PKIError",
    "certificate_info",
    "check_certificate_validity",
    "create_ca",
    "ensure_node_key",
    "fingerprint",
    "issue_server_certificate",
    "load_node_public_key",
    "public_key_openssh",
    "verify_signed_by",
]
