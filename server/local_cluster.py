"""A whole consortium on one machine: coordinator + hospitals on loopback, real processes, real TLS.

This is what `make demo`, the end-to-end tests and bench/federation.py run. Nothing is simulated:
the coordinator is `vilref-server start` in its own process (which runs the SuperLink with TLS and
node authentication), each hospital is `vilref-client join` in its own process (which runs a
SuperNode with the site directory as node config). The API only automates what the two people do
by hand: init, exchange keys, add sites, start, watch, export.

    with LocalCluster(workdir, [site_a, site_b, site_c], rounds=2, model="tiny") as cluster:
        cluster.start_sites()
        cluster.start_coordinator()
        status = cluster.wait_finished(timeout=600)
        cluster.export(out=workdir / "model.pt")
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.consortium import Consortium
from server.db import CoordinatorDB
from server.live import status_dict
from server.processes import PARENT_ENV, ManagedProcess, free_port
from server.superlink import https_ready
from vilref_fed.offline import child_env


class ClusterError(RuntimeError):
    pass


@dataclass
class LocalSite:
    name: str
    site_dir: Path
    proc: ManagedProcess | None = None


@dataclass
class LocalCluster:
    """Consortium directory `workdir/consortium`, one `vilref-client join` process per site.

    `train`: [train] settings sent to every site (e.g. {"batch_size": 8, "queue_size": 64});
    `sites`/`run`/`strategy`/`safety`: run.toml overrides by section; `env`: extra environment for
    every process (e.g. {"OMP_NUM_THREADS": "1"} on a small machine).
    """

    workdir: Path
    site_dirs: Sequence[Path]
    rounds: int = 2
    model: str = "tiny"
    min_sites: int = 2
    local_epochs: int = 1
    local_steps: int = 0
    strategy: str = "fedavg"
    train: dict[str, Any] = field(default_factory=dict)
    sites: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    safety: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    retry_s: float = 2.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.consortium = Consortium(self.workdir / "consortium")
        self.port = 0
        self.coordinator: ManagedProcess | None = None
        self.members: dict[str, LocalSite] = {}
        self._coord_starts = 0

    # ------------------------------------------------------------------ set-up
    def init(self) -> LocalCluster:
        """Create the consortium (CA, certificate for localhost, run.toml) and register every site."""
        from client.site_state import node_key_dir
        from server.setup import create_consortium
        from server.sites import add_site
        from vilref_fed.data.site import open_site
        from vilref_fed.security import ensure_node_key

        for d in self.site_dirs:
            d = Path(d).resolve()
            site = open_site(d)
            name = site.config.name
            site.close()
            if name in self.members:
                raise ClusterError(f"two site directories are named {name!r}")
            self.members[name] = LocalSite(name, d)
        if not self.consortium.exists():
            self.port = free_port()
            create_consortium(
                self.consortium, hosts=["127.0.0.1"], port=self.port, model=self.model, rounds=self.rounds,
                local_epochs=self.local_epochs, local_steps=self.local_steps, strategy=self.strategy,
                min_sites=self.min_sites,
                overrides={
                    "server": {"host": "127.0.0.1"}, "train": dict(self.train), "sites": dict(self.sites),
                    "run": dict(self.run), "strategy": dict(self.strategy_options),
                    "safety": dict(self.safety), "privacy": dict(self.privacy),
                },
            )  # fmt: skip
            db = CoordinatorDB(self.consortium.database_url())
            try:
                for m in self.members.values():
                    key = ensure_node_key(node_key_dir(m.site_dir), comment=f"vilref-site-{m.name}")
                    add_site(self.consortium, db, m.name, key.public_path)
            finally:
                db.close()
        else:
            self.port = self.consortium.config().server.port
        return self

    def add_unregistered_site(self, site_dir: Path) -> LocalSite:
        """A site that has a node key but was never added by the coordinator (for negative tests)."""
        from client.site_state import node_key_dir
        from vilref_fed.data.site import open_site
        from vilref_fed.security import ensure_node_key

        site = open_site(site_dir)
        name = site.config.name
        site.close()
        ensure_node_key(node_key_dir(Path(site_dir)), comment=f"vilref-site-{name}")
        m = LocalSite(name, Path(site_dir).resolve())
        self.members[name] = m
        return m

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return child_env({"PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()), **self.env})

    # ------------------------------------------------------------------ processes
    def start_coordinator(self, resume: bool = False, ready_timeout: float = 120.0) -> ManagedProcess:
        """Start `vilref-server start` and return once its SuperLink accepts TLS connections (sites
        started before that back off for up to ~15 s between connection attempts)."""
        if self.coordinator is not None and self.coordinator.alive():
            raise ClusterError("the coordinator is already running")
        self._coord_starts += 1
        args = [sys.executable, "-m", "server.cli", "start", "--dir", str(self.consortium.root), "--no-live"]
        if resume:
            args.append("--resume")
        self.coordinator = ManagedProcess(
            "coordinator",
            args,
            self.workdir / "logs" / f"coordinator-{self._coord_starts}.log",
            env=self._env(),
        ).start()
        self.coordinator.wait_until(
            lambda: https_ready(self.address, self.consortium.ca_cert),
            ready_timeout,
            "serve TLS",
            interval=0.3,
        )
        return self.coordinator

    def start_site(
        self, name: str, retry_for_s: float = 0.0, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        m = self.members[name]
        if m.proc is not None and m.proc.alive():
            raise ClusterError(f"site {name} is already running")
        args = [
            sys.executable, "-m", "client.cli", "join", "--site-dir", str(m.site_dir),
            "--server", self.address, "--ca", str(self.consortium.ca_cert), "--retry-s", str(self.retry_s),
        ]  # fmt: skip
        if retry_for_s:
            args += ["--retry-for-s", str(retry_for_s)]
        log = self.workdir / "logs" / f"join-{name}.log"
        m.proc = ManagedProcess(f"site {name}", args, log, env={**self._env(), **(env or {})})
        m.proc.start()
        return m.proc

    def start_sites(self, names: Sequence[str] | None = None) -> None:
        for name in names or list(self.members):
            self.start_site(name)

    def kill_site(self, name: str) -> None:
        """SIGKILL the site's join process and its SuperNode tree: a crash, not a goodbye."""
        m = self.members[name]
        if m.proc is not None:
            m.proc.kill()

    def stop_site(self, name: str) -> None:
        m = self.members[name]
        if m.proc is not None:
            m.proc.stop()

    def kill_coordinator(self) -> None:
        """`kill -9` of the `vilref-server start` process alone; its SuperLink (started with a parent-death
        signal) and the ServerApp under it go down with it."""
        if self.coordinator is not None:
            self.coordinator.kill_main()

    # ------------------------------------------------------------------ watching
    def status(self) -> dict[str, Any]:
        db = CoordinatorDB(self.consortium.database_url())
        try:
            return status_dict(db)
        finally:
            db.close()

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str, interval: float = 1.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if self.coordinator is not None and not self.coordinator.alive():
                st = self.status()
                if predicate(st):
                    return st
                raise ClusterError(f"the coordinator exited before {what}:\n{self.coordinator.log_tail(25)}")
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}; status: {st.get('run')}"
                )
            time.sleep(interval)

    def wait_round(self, round_no: int, timeout: float = 600.0) -> dict[str, Any]:
        def done(st: dict[str, Any]) -> bool:
            return any(r["round"] == round_no and r["status"] == "completed" for r in st["rounds"])

        return self.wait_until(done, timeout, f"round {round_no} to complete")

    def wait_finished(self, timeout: float = 1200.0) -> dict[str, Any]:
        """Wait until the coordinator process exits; returns the final status (run, rounds, sites)."""
        assert self.coordinator is not None
        deadline = time.monotonic() + timeout
        while self.coordinator.alive():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the run did not finish within {timeout:.0f} s; status: {self.status()['run']}"
                )
            time.sleep(1.0)
        return self.status()

    def export(self, out: Path, round_no: int | None = None) -> Path:
        from server.export import export_round

        path, _ = export_round(self.consortium, Path(out), round_no)
        return path

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop every process this cluster started (sites first, then the coordinator)."""
        for m in self.members.values():
            if m.proc is not None:
                with contextlib.suppress(Exception):
                    m.proc.stop(timeout=5)
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop(timeout=10)

    def __enter__(self) -> LocalCluster:
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.close()
