"""`vilref-client keys`: the hospital's half of the key ceremony (create, show, rotate the node key).

The node key is what the coordinator registers to let this hospital's SuperNode in. It is created
here, on the hospital's machine, so the private half never travels: only `keys/node_key.pub` is sent
to the coordinator, and both sides compare the fingerprint over the phone. `join` would create the
key on first use too, but a key ceremony comes before the first connection (and before the
coordinator's address is known), so it has its own commands.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import typer

from client.common import console, err_console, fail

keys_app = typer.Typer(
    name="keys",
    help="This site's node key: create it, show it (with the CA's expiry), rotate it.",
    no_args_is_help=True,
)

SITE_DIR_OPTION = typer.Option(
    ..., "--site-dir", help="The site directory (created by `vilref-client init`)."
)
RETIRED_DIR = "retired"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    app.add_typer(keys_app, name="keys")


def _site_name(site_dir: Path) -> str:
    from vilref_fed.data.site import SiteError, open_site

    try:
        site = open_site(site_dir)
    except SiteError as err:
        fail(str(err))
    name = site.config.name
    site.close()
    return name


def _print_key(name: str, key: object, out: Path | None, created: bool, coordinator_cmd: str) -> None:
    console.print(
        f"{'Created the' if created else 'The'} node key of site [bold]{name}[/]: {key.public_path}",  # type: ignore[attr-defined]
        highlight=False,
    )
    console.print(key.public_openssh, highlight=False, soft_wrap=True, markup=False)  # type: ignore[attr-defined]
    console.print(f"Fingerprint: {key.fingerprint}", highlight=False)  # type: ignore[attr-defined]
    if out is not None:
        console.print(f"Copied the public key to {out}", highlight=False)
    console.print(
        "Send node_key.pub (never node_key) to the consortium coordinator, who registers it with "
        f"`vilref-server {coordinator_cmd} {name} --public-key {name}.pub`; read the fingerprint to each "
        "other on the phone before it is registered.",
        highlight=False,
    )


def _copy_public(src: Path, out: Path | None) -> Path | None:
    if out is None:
        return None
    out = out.expanduser()
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file name, e.g. {out / 'site.pub'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    except OSError as err:
        fail(f"cannot write {out}: {err.strerror or err}")
    return out


@keys_app.command("create")
def create(
    site_dir: Path = SITE_DIR_OPTION,
    out: Path = typer.Option(
        None, "--out", help="Also copy the public key to this file (what you send to the coordinator)."
    ),
) -> None:
    """Create this site's node key pair (or show the existing one: a key is never replaced silently)."""
    from client.site_state import node_key_dir
    from vilref_fed.security import PKIError, ensure_node_key

    site_dir = site_dir.expanduser().resolve()
    name = _site_name(site_dir)
    try:
        key = ensure_node_key(node_key_dir(site_dir), comment=f"vilref-site-{name}")
    except PKIError as err:
        fail(str(err))
    _print_key(name, key, _copy_public(key.public_path, out), key.created, "add-site")


@keys_app.command("show")
def show(
    site_dir: Path = SITE_DIR_OPTION,
    ca: Path = typer.Option(
        None, "--ca", help="The consortium's CA certificate: also show its fingerprint and expiry."
    ),
) -> None:
    """Show the public node key, its fingerprint and (with --ca) the consortium CA's validity."""
    from client.site_state import node_key_dir
    from vilref_fed.security import PKIError, certificate_info, fingerprint, load_node_public_key
    from vilref_fed.security.expiry import CA_REMEDY, CertificateCheck, check_certificates

    site_dir = site_dir.expanduser().resolve()
    name = _site_name(site_dir)
    pub = node_key_dir(site_dir) / "node_key.pub"
    if not pub.exists():
        fail(
            f"site {name} has no node key yet; create it with "
            f"`vilref-client keys create --site-dir {site_dir}`"
        )
    try:
        key = load_node_public_key(pub)
    except PKIError as err:
        fail(str(err))
    console.print(f"Site {name}: {pub}", highlight=False)
    console.print(pub.read_text(encoding="utf-8").strip(), highlight=False, soft_wrap=True, markup=False)
    console.print(f"Fingerprint: {fingerprint(key)}", highlight=False)
    if ca is None:
        return
    try:
        info = certificate_info(ca)
        status = check_certificates([CertificateCheck("consortium CA certificate", ca, CA_REMEDY)])[0]
    except PKIError as err:
        fail(str(err))
    console.print(
        f"Consortium CA: {info.subject}, SHA-256 {info.fingerprint_sha256}, valid until "
        f"{info.not_after:%Y-%m-%d} ({status.days_left:.0f} days)",
        highlight=False,
    )
    if status.warning:
        err_console.print(f"[yellow]warning:[/] {status.warning}", highlight=False)


@keys_app.command("rotate")
def rotate(
    site_dir: Path = SITE_DIR_OPTION,
    out: Path = typer.Option(None, "--out", help="Also copy the new public key to this file."),
) -> None:
    """Replace the node key: the old pair is kept under keys/retired/, a new pair is created.

    The coordinator must then register the new public key (`vilref-server pki replace-site-key`);
    restart `vilref-client join` (the vilref-site service) afterwards. Until the coordinator has
    registered the new key, the coordinator refuses this site.
    """
    from client.site_state import node_key_dir
    from vilref_fed.security import PKIError, ensure_node_key
    from vilref_fed.security.node_keys import NODE_KEY_NAME, NODE_PUB_NAME

    site_dir = site_dir.expanduser().resolve()
    name = _site_name(site_dir)
    kdir = node_key_dir(site_dir)
    priv, pub = kdir / NODE_KEY_NAME, kdir / NODE_PUB_NAME
    if not priv.exists():
        fail(f"site {name} has no node key to rotate; create one with `vilref-client keys create`")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = kdir / RETIRED_DIR / stamp
    try:
        retired.mkdir(parents=True, exist_ok=False)
        os.chmod(retired.parent, 0o700)
        os.replace(priv, retired / NODE_KEY_NAME)
        if pub.exists():
            os.replace(pub, retired / NODE_PUB_NAME)
    except OSError as err:
        fail(f"cannot retire the old key into {retired}: {err.strerror or err}")
    try:
        key = ensure_node_key(kdir, comment=f"vilref-site-{name}")
    except PKIError as err:
        fail(str(err))
    console.print(
        f"The old key pair is kept in {retired} (delete it once the new key works).", highlight=False
    )
    _print_key(name, key, _copy_public(key.public_path, out), True, "pki replace-site-key")
    console.print(
        "Then restart this site's SuperNode (`sudo systemctl restart vilref-site`).", highlight=False
    )
