"""`vilref-server pki`: the coordinator's half of the key ceremony beyond init/add-site/remove-site.

- `pki show`: the consortium CA and the server certificate (fingerprints to read to hospitals, SANs,
  validity, a warning 30 days before expiry, exit code 1 when one has expired), so renewal is planned
  rather than discovered through TLS failures.
- `pki replace-site-key`: key rotation for a registered hospital (the old key stops working at once
  when the coordinator runs, or at its next start).

Creating the CA is `vilref-server init`, renewing the server certificate is
`vilref-server init --renew-server-cert`, revoking a site is `vilref-server remove-site`: those
commands already exist and are not repeated here (deploy/pki/README.md walks through all of them).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from server.common import console, err_console, fail

pki_app = typer.Typer(
    name="pki",
    help="Consortium certificates and site keys: show expiry, replace a site's node key.",
    no_args_is_help=True,
)

DIR_OPTION = typer.Option(Path("."), "--dir", "-d", help="Consortium directory.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-server app."""
    app.add_typer(pki_app, name="pki")


@pki_app.command("show")
def show(
    dir: Path = DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the CA and server certificates: fingerprints, SANs, validity; warn 30 days before expiry."""
    from server.cert_checks import coordinator_certificate_checks
    from server.consortium import ConsortiumError, open_consortium
    from vilref_fed.security import PKIError, certificate_info
    from vilref_fed.security.expiry import WARN_DAYS, check_certificates

    try:
        c = open_consortium(dir)
    except ConsortiumError as err:
        fail(str(err))
    rows = []
    expired: list[str] = []
    for check in coordinator_certificate_checks(c):
        try:
            info = certificate_info(check.path)
        except PKIError as err:
            fail(str(err))
        try:
            status = check_certificates([check])[0]
            days, warning = status.days_left, status.warning
        except PKIError as err:
            days, warning = info.days_left(), str(err)
            expired.append(str(err))
        rows.append(
            {
                "certificate": check.label,
                "path": str(check.path),
                "subject": info.subject,
                "sans": list(info.sans),
                "not_after": info.not_after.isoformat(timespec="seconds"),
                "days_left": round(days, 1),
                "sha256": info.fingerprint_sha256,
                "warning": warning,
            }
        )
    if as_json:
        console.print_json(json.dumps({"warn_days": WARN_DAYS, "certificates": rows}))
    else:
        for r in rows:
            console.print(f"[bold]{r['certificate']}[/] {r['path']}", highlight=False)
            console.print(f"  subject {r['subject']}", highlight=False, markup=False)
            if r["sans"]:
                console.print(f"  SANs    {', '.join(r['sans'])}", highlight=False, markup=False)
            console.print(
                f"  valid until {r['not_after']} UTC ({r['days_left']:.0f} days)",
                highlight=False,
                markup=False,
            )
            console.print(f"  SHA-256 {r['sha256']}", highlight=False, markup=False)
        for r in rows:
            if r["warning"] and r["warning"] not in expired:
                err_console.print(f"[yellow]warning:[/] {r['warning']}", highlight=False)
    if expired:
        fail("; ".join(expired), code=1)


@pki_app.command("replace-site-key")
def replace_site_key(
    name: str = typer.Argument(..., help="The registered site whose key is replaced."),
    public_key: Path = typer.Option(
        ..., "--public-key", help="The site's new node_key.pub (from `vilref-client keys rotate`)."
    ),
    dir: Path = DIR_OPTION,
) -> None:
    """Rotate a site's node key: unregister the old key, register the new one (same site name)."""
    from sqlalchemy import select

    from server.cmd_consortium import _running_cli
    from server.consortium import ConsortiumError, open_consortium
    from server.db import CoordinatorDB, SiteRow
    from server.flower_cli import FlowerCLIError
    from server.sites import SiteRegistryError, add_site, remove_site
    from vilref_fed.security import PKIError, fingerprint, load_node_public_key

    try:
        c = open_consortium(dir)
        new_fp = fingerprint(load_node_public_key(public_key))
    except (ConsortiumError, PKIError) as err:
        fail(str(err))
    db = CoordinatorDB(c.database_url())
    try:
        with db.session() as s:
            row = s.scalars(select(SiteRow).where(SiteRow.name == name)).first()
            current = (row.status, row.fingerprint) if row is not None else None
        if current is None or current[0] != "active":
            fail(f"no active site named {name!r}; see `vilref-server sites` (new sites use add-site)")
        if current[1] == new_fp:
            fail(
                f"{public_key} is the key already registered for {name} ({new_fp}); the hospital creates a "
                "new one with `vilref-client keys rotate`"
            )
        cli = _running_cli(c)
        try:
            remove_site(db, name, cli)  # type: ignore[arg-type]
            added = add_site(c, db, name, public_key, cli)  # type: ignore[arg-type]
        except (SiteRegistryError, FlowerCLIError) as err:
            fail(f"{err} (site {name} is now removed; register a valid key with `vilref-server add-site`)")
        db.event("site-key-replaced", f"{name}: key {current[1]} replaced by {new_fp}", site_name=name)
    finally:
        db.close()
    console.print(f"Site [bold]{name}[/]: old key {current[1]} revoked, new key {added.fingerprint}.")
    console.print(
        "Registered with the running SuperLink."
        if added.registered_now
        else "The SuperLink registers the new key (and drops the old one) when `vilref-server start` runs."
    )
