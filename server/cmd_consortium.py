"""`vilref-server` commands: consortium set-up (init) and hospitals (add-site, remove-site, sites)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from server.common import console, fail

DIR_OPTION = typer.Option(Path("."), "--dir", "-d", help="Consortium directory.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-server app."""
    app.command("init")(init)
    app.command("add-site")(add_site)
    app.command("remove-site")(remove_site)
    app.command("sites")(sites)


def init(
    dir: Path = typer.Option(..., "--dir", "-d", help="Consortium directory to create."),
    host: list[str] = typer.Option(
        [],
        "--host",
        help="Host name or IP address hospitals dial (repeat for several); localhost is always added.",
    ),
    port: int = typer.Option(9092, "--port", help="TCP port of the SuperLink."),
    model: str = typer.Option(
        "tiny", "--model", help="Model configuration (tiny, small, small-zh, vilref-rn50, ...)."
    ),
    rounds: int = typer.Option(3, "--rounds", help="Federated rounds."),
    local_epochs: int = typer.Option(1, "--local-epochs", help="Local epochs per round."),
    local_steps: int = typer.Option(
        0, "--local-steps", help="Local steps per round (overrides epochs if > 0)."
    ),
    strategy: str = typer.Option(
        "fedavg", "--strategy", help="fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg."
    ),
    min_sites: int = typer.Option(2, "--min-sites", help="Sites that must answer for a round to count."),
    database_url: str = typer.Option("", "--database-url", help="PostgreSQL URL (default: SQLite in DIR)."),
    renew_server_cert: bool = typer.Option(
        False,
        "--renew-server-cert",
        help="Issue a new server certificate (same CA) for an existing consortium.",
    ),
) -> None:
    """Create a consortium: CA, server certificate, run configuration (run.toml) and database."""
    from server.consortium import Consortium, ConsortiumError
    from server.db import CoordinatorDB
    from server.run_config import RunConfigError
    from server.setup import ConsortiumSetupError, create_consortium, renew_server_certificate

    c = Consortium(dir.expanduser().resolve())
    try:
        if renew_server_cert:
            info = renew_server_certificate(c, host)
            console.print(
                f"New server certificate {c.server_cert} valid until {info.not_after:%Y-%m-%d}; "
                f"SANs: {', '.join(info.sans)}. Restart `vilref-server start`."
            )
            return
        summary = create_consortium(
            c,
            hosts=host,
            port=port,
            model=model,
            rounds=rounds,
            local_epochs=local_epochs,
            local_steps=local_steps,
            strategy=strategy,
            min_sites=min_sites,
            database_url=database_url,
        )
        CoordinatorDB(c.database_url()).close()
    except (ConsortiumError, ConsortiumSetupError, RunConfigError, ValueError) as err:
        fail(str(err))
    console.print(f"[bold green]Consortium created[/] in {c.root}")
    console.print(f"  CA certificate (send to every hospital): {c.ca_cert}")
    console.print(f"  CA fingerprint (read it to them on the phone): SHA256 {summary['ca_fingerprint']}")
    console.print(f"  Server certificate SANs: {', '.join(summary['sans'])}")
    console.print(f"  Run configuration: {c.run_toml} (model {model}, {rounds} rounds, {strategy})")
    console.print(
        f"  Ontology hash: {summary['ontology_hash'][:16]}…  model config hash: {summary['model_hash'][:16]}…"
    )
    console.print(
        "Next: each hospital runs `vilref-client join --site-dir SITE --server HOST:PORT --ca ca.crt`, "
        "sends you its node_key.pub, and you run `vilref-server add-site NAME --public-key FILE`."
    )


def _running_cli(c: object) -> object | None:
    """A FlowerCLI bound to the running coordinator's SuperLink, or None when it is not running."""
    from server.consortium import CONNECTION_NAME
    from server.coordinator import read_pid_file
    from server.flower_cli import FlowerCLI
    from server.superlink import https_ready

    info = read_pid_file(c)  # type: ignore[arg-type]
    if not info:
        return None
    if not https_ready(f"127.0.0.1:{info['port']}", c.ca_cert):  # type: ignore[attr-defined]
        return None
    return FlowerCLI(c.flwr_home, CONNECTION_NAME)  # type: ignore[attr-defined]


def add_site(
    name: str = typer.Argument(..., help="Site name shown to the consortium (letters, digits, '-')."),
    public_key: Path = typer.Option(
        ..., "--public-key", help="The site's node_key.pub (from vilref-client join)."
    ),
    dir: Path = DIR_OPTION,
) -> None:
    """Register a hospital: its node key in the SuperLink and a row in the coordinator database."""
    from server.consortium import ConsortiumError, open_consortium
    from server.db import CoordinatorDB
    from server.flower_cli import FlowerCLIError
    from server.sites import SiteRegistryError
    from server.sites import add_site as _add

    try:
        c = open_consortium(dir)
        db = CoordinatorDB(c.database_url())
        added = _add(c, db, name, public_key, _running_cli(c))  # type: ignore[arg-type]
    except (ConsortiumError, SiteRegistryError, FlowerCLIError) as err:
        fail(str(err))
    console.print(f"Site [bold]{added.name}[/] added, key {added.fingerprint}.")
    if added.registered_now:
        console.print(f"Registered with the running SuperLink as node {added.node_id}.")
    else:
        console.print("It will be registered with the SuperLink when `vilref-server start` runs.")


def remove_site(
    name: str = typer.Argument(..., help="Site to remove."),
    dir: Path = DIR_OPTION,
) -> None:
    """Remove a hospital: it can no longer connect, and rounds stop waiting for it."""
    from server.consortium import ConsortiumError, open_consortium
    from server.db import CoordinatorDB
    from server.flower_cli import FlowerCLIError
    from server.sites import SiteRegistryError
    from server.sites import remove_site as _remove

    try:
        c = open_consortium(dir)
        db = CoordinatorDB(c.database_url())
        now = _remove(db, name, _running_cli(c))  # type: ignore[arg-type]
    except (ConsortiumError, SiteRegistryError, FlowerCLIError) as err:
        fail(str(err))
    console.print(
        f"Site {name} removed"
        + (
            " and unregistered from the running SuperLink."
            if now
            else "; its key is unregistered when the coordinator next starts."
        )
    )


def sites(
    dir: Path = DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    all_: bool = typer.Option(False, "--all", help="Include removed sites."),
) -> None:
    """List hospitals with their key fingerprint and last-seen state."""
    from rich.table import Table

    from server.consortium import ConsortiumError, open_consortium
    from server.db import CoordinatorDB

    try:
        c = open_consortium(dir)
        rows = CoordinatorDB(c.database_url()).all_sites()
    except ConsortiumError as err:
        fail(str(err))
    rows = [r for r in rows if all_ or r.status == "active"]
    data = [
        {
            "name": r.name,
            "status": r.status,
            "fingerprint": r.fingerprint,
            "node_id": r.node_id,
            "registered": bool(r.registered),
            "last_seen": r.last_seen_at.isoformat(timespec="seconds") + "Z" if r.last_seen_at else None,
            "last_state": r.last_state,
            "last_round": r.last_round,
        }
        for r in rows
    ]
    if as_json:
        console.print_json(json.dumps(data))
        return
    if not data:
        console.print("No sites yet: `vilref-server add-site NAME --public-key FILE`.")
        return
    t = Table(title=f"Sites of {c.root.name}")
    for col in ("name", "status", "key", "registered", "last seen (UTC)", "state", "last round"):
        t.add_column(col)
    for d in data:
        t.add_row(
            d["name"],
            d["status"],
            d["fingerprint"][:20] + "…",
            "yes" if d["registered"] else "no",
            d["last_seen"] or "never",
            d["last_state"] or "-",
            str(d["last_round"] or "-"),
        )
    console.print(t)
