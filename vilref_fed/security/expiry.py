"""Certificate expiry as people meet it: a refusal when expired, a warning a month ahead.

An expired certificate does not announce itself: the coordinator's SuperLink starts happily and every
hospital sees an opaque TLS handshake failure. So every process that starts (the coordinator, each
hospital's SuperNode) checks the certificates it relies on first, and says what to do while there is
still time: 30 days is one change-window cycle in most hospital IT departments.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from vilref_fed.security.pki import certificate_info, check_certificate_validity

WARN_DAYS = 30.0

CA_REMEDY = (
    "the CA cannot be extended in place: create a new consortium CA with the coordinator "
    "(deploy/pki/README.md, 'Replacing the CA') and send the new ca.crt to every hospital"
)


@dataclass(frozen=True)
class CertificateCheck:
    """One certificate a process depends on, and what its owner must do before it expires."""

    label: str
    path: Path
    remedy: str


@dataclass(frozen=True)
class CertificateStatus:
    label: str
    path: Path
    not_after: dt.datetime
    days_left: float
    warning: str | None


def check_certificates(
    checks: list[CertificateCheck], warn_days: float = WARN_DAYS, now: dt.datetime | None = None
) -> list[CertificateStatus]:
    """Validity of each certificate; raises CertificateExpiredError (a PKIError) for one outside it.

    A status carries a warning when fewer than `warn_days` days are left.
    """
    out: list[CertificateStatus] = []
    for c in checks:
        days = check_certificate_validity(c.path, warn_days=warn_days, now=now)
        info = certificate_info(c.path)
        warning = None
        if days < warn_days:
            warning = (
                f"the {c.label} {c.path} expires in {max(days, 0.0):.0f} days "
                f"({info.not_after:%Y-%m-%d} UTC); {c.remedy}"
            )
        out.append(CertificateStatus(c.label, Path(c.path), info.not_after, days, warning))
    return out


def expiry_warnings(
    checks: list[CertificateCheck], warn_days: float = WARN_DAYS, now: dt.datetime | None = None
) -> list[str]:
    """The warnings of `check_certificates` alone (what a starting process prints)."""
    return [s.warning for s in check_certificates(checks, warn_days, now) if s.warning]
