"""`vilref-server start` as an API: SuperLink up, hospitals registered, run submitted, run watched.

The coordinator process owns the SuperLink (and through it the ServerApp). If this process is
killed, the SuperLink and ServerApp die with it (the SuperLink's helpers watch their parent); the
database and the checkpoints of completed rounds remain, and `start --resume` continues the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from server.cert_checks import coordinator_certificate_checks
from server.consortium import Consortium
from server.db import AttemptRow, CoordinatorDB, RunRow
from server.flower_app import write_app_dir
from server.run_config import RunConfig
from server.sites import sync_registrations
from server.superlink import SuperLink
from vilref_fed.logs import get_logger
from vilref_fed.security.expiry import expiry_warnings

log = get_logger("server.coordinator")

FINISHED_PREFIX = "finished"


class CoordinatorError(RuntimeError):
    pass


@dataclass
class RunOutcome:
    run_uid: str
    status: str  # completed | failed | stopped
    message: str
    rounds_completed: int


def flower_run_config(c: Consortium, cfg: RunConfig, run_uid: str, resume: bool) -> dict[str, Any]:
    """The Flower run config (what the ServerApp and the ClientApp mods read from the context)."""
    out: dict[str, Any] = {"consortium-dir": str(c.root), "run-uid": run_uid, "resume": bool(resume)}
    out["train.objective"] = str(cfg.train.get("objective", "wscl"))
    out["min-sites"] = int(cfg.sites.min_sites)
    for k, v in cfg.privacy.items():
        if v is not None:
            out[f"privacy.{str(k).replace('_', '-')}"] = v
    return out


def read_pid_file(c: Consortium) -> dict[str, Any] | None:
    try:
        data = json.loads(c.pid_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(data.get("pid", 0))
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return data


class Coordinator:
    def __init__(self, c: Consortium, host: str | None = None, port: int | None = None) -> None:
        self.c = c
        self.cfg = c.config()
        self.db = CoordinatorDB(c.database_url(self.cfg))
        self.host = host or self.cfg.server.host
        self.port = int(port or self.cfg.server.port)
        self.superlink: SuperLink | None = None
        self.run_uid: str | None = None
        self.flower_run_id: str | None = None
        self.startup_s: float | None = None

    # ---------------------------------------------------------------- start
    def prepare_run(self, resume: bool) -> RunRow:
        """The run row to execute: the interrupted one (resume) or a new one."""
        latest = self.db.latest_run()
        if resume:
            if latest is None:
                raise CoordinatorError("nothing to resume: no run was started in this consortium yet")
            if latest.status == "completed":
                raise CoordinatorError(
                    f"nothing to resume: run {latest.uid} completed all {latest.rounds_planned} rounds; "
                    "start a new run without --resume"
                )
            done = len(self.db.completed_rounds(latest.id))
            with self.db.session() as s:
                row = s.get(RunRow, latest.id)
                row.rounds_planned, row.status, row.message = self.cfg.run.rounds, "submitted", None
            self.db.event(
                "resume-requested",
                f"resume of run {latest.uid} after {done} completed rounds",
                run_uid=latest.uid,
            )
            return latest
        with self.db.session() as s:
            row = RunRow(
                uid=uuid.uuid4().hex[:12],
                rounds_planned=self.cfg.run.rounds,
                config_json=json.dumps(self.cfg.to_dict()),
                status="submitted",
            )
            s.add(row)
            s.flush()
            return row

    def start(self, resume: bool = False, ready_timeout: float = 60.0) -> str:
        """Start the SuperLink, sync registrations, submit the run. Returns the run uid."""
        for warning in expiry_warnings(coordinator_certificate_checks(self.c)):  # raises when expired
            log.warning("%s", warning)
        active = self.db.active_sites()
        if len(active) < self.cfg.sites.min_sites:
            raise CoordinatorError(
                f"{len(active)} sites registered but sites.min_sites = {self.cfg.sites.min_sites}; register "
                "hospitals with `vilref-server add-site NAME --public-key FILE`"
            )
        other = read_pid_file(self.c)
        if other is not None and other.get("pid") != os.getpid():
            raise CoordinatorError(f"a coordinator is already running for {self.c.root} (pid {other['pid']})")
        run = self.prepare_run(resume)
        self.run_uid = run.uid
        self.c.make_dirs()
        self.c.pid_file.write_text(json.dumps({"pid": os.getpid(), "port": self.port, "run_uid": run.uid}))
        t0 = time.monotonic()
        self.superlink = SuperLink(self.c, self.host, self.port).start(timeout=ready_timeout)
        self.startup_s = time.monotonic() - t0
        done = sync_registrations(self.c, self.db, self.superlink.cli)
        for d in done:
            log.info("%s", d)
        write_app_dir(self.c.app_dir, flower_run_config(self.c, self.cfg, run.uid, resume))
        self.flower_run_id = self.superlink.cli.submit_run(self.c.app_dir, {})
        self.db.event(
            "submitted", f"run {run.uid} submitted to Flower as run {self.flower_run_id}", run_uid=run.uid
        )
        return run.uid

    # ---------------------------------------------------------------- watch
    def poll(self) -> RunOutcome | None:
        """None while running; the outcome once this submission's ServerApp finished (or died).

        The outcome is read from this submission's attempt row, never from the run row alone: after
        a resume, the run row still says how the killed attempt ended until the new ServerApp starts.
        """
        assert self.run_uid is not None and self.superlink is not None
        attempt = self._attempt()
        if attempt is not None and attempt.status in ("completed", "failed", "stopped"):
            return RunOutcome(self.run_uid, attempt.status, attempt.message or "", self._done())
        if not self.superlink.alive():
            return RunOutcome(
                self.run_uid, "failed", "the SuperLink exited; see logs/superlink.log", self._done()
            )
        return None

    def _attempt(self) -> AttemptRow | None:
        if not self.flower_run_id:
            return None
        with self.db.session() as s:
            return s.scalars(
                select(AttemptRow).where(AttemptRow.flower_run_id == str(self.flower_run_id))
            ).first()

    def _flower_finished(self) -> str | None:
        assert self.superlink is not None and self.flower_run_id is not None
        try:
            status = self.superlink.cli.run_status(self.flower_run_id)
        except Exception:  # the CLI itself failing is not the run failing
            return None
        return status if status and status.startswith(FINISHED_PREFIX) else None

    def _done(self) -> int:
        run = self.db.run_by_uid(self.run_uid or "")
        return len(self.db.completed_rounds(run.id)) if run else 0

    def _outcome(self, run: RunRow) -> RunOutcome:
        return RunOutcome(run.uid, run.status, run.message or "", self._done())

    def wait(
        self, timeout: float | None = None, on_tick: Callable[[], None] | None = None, interval: float = 1.0
    ) -> RunOutcome:
        deadline = None if timeout is None else time.monotonic() + timeout
        last_flower_check = time.monotonic()
        while True:
            out = self.poll()
            if out is not None:
                return out
            if on_tick is not None:
                on_tick()
            now = time.monotonic()
            if now - last_flower_check > 10:
                last_flower_check = now
                status = self._flower_finished()
                if status is not None:
                    time.sleep(1.0)  # the ServerApp writes its outcome before it exits
                    out = self.poll()
                    if out is not None:
                        return out
                    return RunOutcome(
                        self.run_uid or "",
                        "failed",
                        f"the ServerApp ended ({status}) without recording an outcome; "
                        "see logs/coordinator.log",
                        self._done(),
                    )
            if deadline is not None and now > deadline:
                raise TimeoutError(f"run {self.run_uid} did not finish within {timeout:.0f} s")
            time.sleep(interval)

    # ---------------------------------------------------------------- stop
    def stop_run(self) -> None:
        if self.superlink is not None and self.superlink.alive() and self.flower_run_id:
            with contextlib.suppress(Exception):
                self.superlink.cli.stop_run(self.flower_run_id)
        run = self.db.run_by_uid(self.run_uid or "")
        if run is not None and run.status in ("running", "submitted"):
            with self.db.session() as s:
                r = s.get(RunRow, run.id)
                r.status, r.message = "stopped", "stopped by the coordinator (resume with start --resume)"

    def close(self) -> None:
        """Stop the SuperLink (and the ServerApp under it); idempotent."""
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None
        with contextlib.suppress(OSError):
            data = json.loads(self.c.pid_file.read_text(encoding="utf-8"))
            if data.get("pid") == os.getpid():
                self.c.pid_file.unlink()
        self.db.close()
