"""`vilref-client join`: take part in the consortium's training with this site's SuperNode."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from client.common import console, err_console, fail


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    app.command("join")(join)


def join(
    site_dir: Path = typer.Option(
        ..., "--site-dir", help="The site directory (created by `vilref-client init`)."
    ),
    server: str = typer.Option("", "--server", help="The coordinator's address, HOST:PORT."),
    ca: Path = typer.Option(
        None, "--ca", help="The consortium's CA certificate (ca.crt from the coordinator)."
    ),
    port: int = typer.Option(
        0, "--port", help="Local Runtime API port of this SuperNode (default: a free one)."
    ),
    retry_s: float = typer.Option(
        10.0, "--retry-s", help="Seconds between attempts when the coordinator refuses."
    ),
    retry_for_s: float = typer.Option(
        0.0, "--retry-for-s", help="Give up after this long when refused (0: keep trying until Ctrl-C)."
    ),
    key_only: bool = typer.Option(
        False, "--key-only", help="Only create/print the node key, do not connect."
    ),
) -> None:
    """Create this site's node key on first use, then run its SuperNode (TLS, node authentication).

    Images, reports, labels and features never leave the site: the SuperNode only sends the shared
    model weights and scalar metrics after each round.
    """
    from client.site_state import node_key_dir
    from client.supernode import JoinError, SuperNodeSpec, run_supernode_forever
    from server.processes import exit_with_parent
    from server.superlink import https_ready
    from vilref_fed.data.site import SiteError, open_site
    from vilref_fed.security import PKIError, certificate_info, ensure_node_key
    from vilref_fed.security.expiry import CA_REMEDY, CertificateCheck, expiry_warnings

    site_dir = site_dir.expanduser().resolve()
    try:
        site = open_site(site_dir)
        name = site.config.name
        site.close()
    except SiteError as err:
        fail(str(err))
    try:
        key = ensure_node_key(node_key_dir(site_dir), comment=f"vilref-site-{name}")
    except PKIError as err:
        fail(str(err))
    if key.created or key_only:
        console.print(f"Node key of site [bold]{name}[/]: {key.public_path}")
        console.print(key.public_openssh, highlight=False, soft_wrap=True)
        console.print(f"Fingerprint: {key.fingerprint}")
        console.print(
            "Send node_key.pub (never node_key) to the consortium coordinator, who registers it with "
            f"`vilref-server add-site {name} --public-key node_key.pub`; confirm the fingerprint by phone."
        )
    if key_only:
        return
    if not server or ca is None:
        fail("--server HOST:PORT and --ca ca.crt are required to join (the coordinator gives both)")
    if ":" not in server or not server.rsplit(":", 1)[1].isdigit():
        fail(f"--server {server!r} must be HOST:PORT, e.g. fl.consortium.org:9092")
    ca = ca.expanduser().resolve()
    try:
        info = certificate_info(ca)
        for warning in expiry_warnings([CertificateCheck("consortium CA certificate", ca, CA_REMEDY)]):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    except PKIError as err:
        fail(str(err))
    if not https_ready(server, ca):
        err_console.print(
            f"[yellow]warning:[/] cannot reach {server} over TLS with {ca.name} ({info.subject}) yet; "
            "the SuperNode will keep trying"
        )

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    exit_with_parent()
    spec = SuperNodeSpec(site_dir, server, ca, key.private_path, port)
    log_path = site_dir / "logs" / "supernode.log"
    console.print(f"Site {name} joining {server}; SuperNode log: {log_path}. Ctrl-C leaves the consortium.")
    try:
        code = run_supernode_forever(
            spec, log_path, retry_s=retry_s, retry_for_s=retry_for_s,
            on_message=lambda m: err_console.print(f"[yellow]{m}[/]"),
        )  # fmt: skip
    except JoinError as err:
        fail(str(err), code=3)
    if code == 130:
        console.print("left the consortium")
        raise typer.Exit(0)
