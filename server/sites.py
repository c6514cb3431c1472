"""Registering hospitals: the coordinator database row, the key file, and the SuperLink registration.

A site can be added or removed while the coordinator is down; `sync_registrations` (run by
`vilref-server start` once the SuperLink is up) makes the SuperLink's registered keys match the
database: active sites registered, removed sites unregistered. When the coordinator is running,
add/remove apply at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from server.consortium import Consortium
from server.db import CoordinatorDB, SiteRow, utcnow
from server.flower_cli import FlowerCLI, FlowerCLIError
from vilref_fed.security import PKIError, fingerprint, load_node_public_key, public_key_openssh

SITE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,31}$")


class SiteRegistryError(ValueError):
    pass


def validate_site_name(name: str) -> str:
    if not SITE_NAME_RE.match(name or ""):
        raise SiteRegistryError(
            f"site name {name!r} is not valid: start with a letter, then letters, digits or '-', at most 32 "
            "characters (it is shown to every participant: never a patient identifier)"
        )
    return name


@dataclass
class AddedSite:
    name: str
    fingerprint: str
    key_path: Path
    registered_now: bool
    node_id: str | None


def add_site(
    c: Consortium, db: CoordinatorDB, name: str, public_key: Path, cli: FlowerCLI | None = None
) -> AddedSite:
    validate_site_name(name)
    try:
        key = load_node_public_key(public_key)
    except PKIError as err:
        raise SiteRegistryError(str(err)) from None
    fp = fingerprint(key)
    text = public_key_openssh(key, name)
    with db.session() as s:
        same_name = s.scalars(select(SiteRow).where(SiteRow.name == name)).first()
        if same_name is not None and same_name.status == "active":
            raise SiteRegistryError(f"site {name!r} is already registered (key {same_name.fingerprint})")
        same_key = s.scalars(
            select(SiteRow).where(SiteRow.fingerprint == fp, SiteRow.status == "active")
        ).first()
        if same_key is not None:
            raise SiteRegistryError(f"this key ({fp}) is already registered for site {same_key.name!r}")
        key_path = c.sites_dir / f"{name}.pub"
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.write_text(text + "\n", encoding="utf-8")
        if same_name is None:
            row = SiteRow(name=name, public_key=text, fingerprint=fp)
            s.add(row)
        else:  # re-adding a removed site: a new key, a fresh registration
            row = same_name
            row.public_key, row.fingerprint, row.status = text, fp, "active"
            row.removed_at, row.node_id, row.registered = None, None, 0
    node_id = None
    if cli is not None:
        node_id = _register(db, cli, name, key_path)
    return AddedSite(name, fp, key_path, node_id is not None, node_id)


def remove_site(db: CoordinatorDB, name: str, cli: FlowerCLI | None = None) -> bool:
    """Mark removed; unregister from the SuperLink now if it runs. Returns True if unregistered now."""
    with db.session() as s:
        row = s.scalars(select(SiteRow).where(SiteRow.name == name)).first()
        if row is None or row.status != "active":
            raise SiteRegistryError(f"no active site named {name!r}; see `vilref-server sites`")
        row.status, row.removed_at = "removed", utcnow()
        node_id, registered = row.node_id, row.registered
    if cli is not None and registered and node_id:
        _unregister(db, cli, name, node_id)
        return True
    return False


def _register(db: CoordinatorDB, cli: FlowerCLI, name: str, key_path: Path) -> str:
    node_id = cli.register_node(key_path, name)
    with db.session() as s:
        row = s.scalars(select(SiteRow).where(SiteRow.name == name)).first()
        row.node_id, row.registered = node_id, 1
    db.event("site-registered", f"{name} registered as node {node_id}", site_name=name)
    return node_id


def _unregister(db: CoordinatorDB, cli: FlowerCLI, name: str, node_id: str) -> None:
    try:
        cli.unregister_node(node_id)
    except FlowerCLIError as err:
        if "not found" not in str(err).lower():
            raise
    with db.session() as s:
        row = s.scalars(select(SiteRow).where(SiteRow.name == name)).first()
        row.registered = 0
    db.event("site-unregistered", f"{name} (node {node_id}) unregistered", site_name=name)


def sync_registrations(c: Consortium, db: CoordinatorDB, cli: FlowerCLI) -> list[str]:
    """Make the SuperLink's registered nodes match the database; returns what was done."""
    done: list[str] = []
    live = {str(n.get("node-id")): str(n.get("status", "")) for n in cli.list_nodes()}
    for row in db.all_sites():
        present = row.node_id is not None and row.node_id in live and live[row.node_id] != "unregistered"
        if row.status == "active" and not present:
            key_path = c.sites_dir / f"{row.name}.pub"
            if not key_path.exists():
                key_path.write_text(row.public_key + "\n", encoding="utf-8")
            _register(db, cli, row.name, key_path)
            done.append(f"registered {row.name}")
        elif row.status == "removed" and present:
            _unregister(db, cli, row.name, str(row.node_id))
            done.append(f"unregistered {row.name}")
        elif row.status == "active" and present and not row.registered:
            with db.session() as s:
                r = s.get(SiteRow, row.id)
                r.registered = 1
    # A key replaced or re-added while the coordinator was down left its old node registered in the
    # SuperLink's state, with no row pointing at it any more: revoke every such orphan.
    keep = {str(r.node_id) for r in db.all_sites() if r.node_id}
    for node_id, status in live.items():
        if status != "unregistered" and node_id not in keep:
            try:
                cli.unregister_node(node_id)
            except FlowerCLIError as err:
                if "not found" not in str(err).lower():
                    raise
            db.event("site-unregistered", f"node {node_id} (a replaced key) unregistered")
            done.append(f"unregistered orphan node {node_id}")
    return done
