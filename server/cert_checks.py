"""The certificates a coordinator depends on, and what its operator must do before each expires.

Shared by `vilref-server start` (warns 30 days ahead, refuses when expired) and `vilref-server pki
show`, so both give the same advice.
"""

from __future__ import annotations

from server.consortium import Consortium
from vilref_fed.security.expiry import CA_REMEDY, CertificateCheck


def coordinator_certificate_checks(c: Consortium) -> list[CertificateCheck]:
    return [
        CertificateCheck("consortium CA certificate", c.ca_cert, CA_REMEDY),
        CertificateCheck(
            "server certificate",
            c.server_cert,
            f"renew it with `vilref-server init --dir {c.root} --renew-server-cert` "
            "and restart the coordinator",
        ),
    ]
