"""Starting, watching and stopping the long-lived Flower processes (SuperLink, SuperNodes).

Flower's processes spawn helpers in their own sessions (a SuperLink starts `flower-superexec`, which
starts `flwr-serverapp`; a SuperNode starts `flower-superexec`, which starts one `flwr-clientapp`
per message). Killing a process group is therefore not enough: `stop()` first collects the whole
descendant tree from /proc, then terminates it, so a test or a Ctrl-C never leaves a stray process
holding a port. Every child gets `vilref_fed.offline.child_env()` plus the virtualenv's bin directory
on PATH (the SuperLink finds `flower-superexec` through PATH).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vilref_fed.offline import child_env

PARENT_ENV = "VILREF_PARENT_PID"


class ProcessStartError(RuntimeError):
    """A process exited or never became ready; the message includes the end of its log."""


def bin_dir() -> Path:
    """The directory holding this interpreter's console scripts (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: offline, no telemetry, our FLWR_HOME, our bin on PATH."""
    env = child_env(extra)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(bin_dir()) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (bind to port 0 and ask the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on the port (connections in TIME_WAIT do not count, as for servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def exit_with_parent(interval: float = 1.0) -> None:
    """When `VILREF_PARENT_PID` is set (by LocalCluster), SIGTERM ourselves once that process is gone,
    so our own clean-up runs (stop the SuperLink / SuperNode tree) even if the parent was SIGKILLed."""
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)

    def _watch() -> None:
        while _alive(parent):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=_watch, name="exit-with-parent", daemon=True).start()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # comm may contain spaces or parentheses: the fields after the last ')' are fixed.
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) < 2:
            continue
        out.setdefault(int(rest[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first), read from /proc."""
    tree = _children_map()
    out: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(tree.get(p, []))
    return out


def _signal(pids: Sequence[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except OSError:
        return False


class ManagedProcess:
    """A child process in its own session, logging to a file, stopped together with its descendants."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else child_env()
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(self.cwd) if self.cwd else None,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        """Poll `ready()` until true; raise ProcessStartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if not self.alive():
                raise ProcessStartError(
                    f"{self.name} exited with code {self.returncode()} before {what}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{self.name} did not {what} within {timeout:.0f} s; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def kill_main(self) -> None:
        """SIGKILL only the main process (what the OOM killer or `kill -9 PID` does); children started
        with die_with_parent get SIGTERM from the kernel and shut down cleanly."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the process and every descendant at once: a crash, for fault tests."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _signal(pids, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the tree, wait up to `timeout`, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.1)
        left = [p for p in pids if _alive(p)] + [p for p in descendants(self.proc.pid) if _alive(p)]
        _signal(left, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
