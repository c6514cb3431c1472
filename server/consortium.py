"""The consortium directory: where every coordinator file lives, in one place.

A coordinator is a directory, not a machine: copying it (with its database) to another host moves
the consortium. Paths are derived here only, so the CLI, the ServerApp and the tests agree.

    DIR/run.toml                  run configuration (server/run_config.py)
    DIR/pki/ca.crt, ca.key        consortium CA (ca.crt goes to every hospital; ca.key never leaves)
    DIR/pki/server.crt, .key      the SuperLink's TLS certificate (SANs = hosts hospitals dial)
    DIR/coordinator.db            coordinator database (unless server.database_url is set)
    DIR/sites/NAME.pub            registered hospital node keys
    DIR/superlink/state.db        Flower's SuperLink state (registered nodes, runs)
    DIR/flwr_home/                FLWR_HOME of every Flower process we start (connections, apps)
    DIR/app/pyproject.toml        the Flower App we submit (code comes from the installed package)
    DIR/checkpoints/round-NNNN.pt global weights + server-optimiser state after each round
    DIR/logs/                     SuperLink, coordinator and ServerApp logs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server.run_config import RunConfig, load_run_config

CONNECTION_NAME = "vilref"


class ConsortiumError(Exception):
    """The directory is not a consortium, or something in it is missing; the message says what to do."""


@dataclass(frozen=True)
class Consortium:
    root: Path

    @property
    def run_toml(self) -> Path:
        return self.root / "run.toml"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.pki / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.pki / "server.key"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def superlink_db(self) -> Path:
        return self.superlink_dir / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr_home"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pid_file(self) -> Path:
        return self.root / "coordinator.pid"

    def checkpoint_path(self, round_no: int) -> Path:
        return self.checkpoints / f"round-{round_no:04d}.pt"

    def database_url(self, cfg: RunConfig | None = None) -> str:
        cfg = cfg or self.config()
        return cfg.server.database_url or str(self.root / "coordinator.db")

    def config(self) -> RunConfig:
        return load_run_config(self.run_toml)

    def exists(self) -> bool:
        return self.run_toml.exists() and self.ca_cert.exists()

    def require(self) -> Consortium:
        if not self.root.is_dir():
            raise ConsortiumError(
                f"{self.root} does not exist; create it with `vilref-server init --dir {self.root}`"
            )
        if not self.exists():
            raise ConsortiumError(
                f"{self.root} is not a consortium directory (no run.toml or pki/ca.crt); "
                f"create one with `vilref-server init --dir {self.root}`"
            )
        return self

    def make_dirs(self) -> None:
        for d in (
            self.pki,
            self.sites_dir,
            self.superlink_dir,
            self.flwr_home,
            self.app_dir,
            self.checkpoints,
            self.logs,
        ):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pki, 0o700)


def open_consortium(path: str | Path) -> Consortium:
    return Consortium(Path(path).expanduser().resolve()).require()
