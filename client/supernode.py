"""Running a hospital's SuperNode: the right flags, a retry loop, and a clear reason when it fails.

Always TLS (verified against the consortium CA given to `join`), always with the site's node key,
always with the site directory as node config, and with its own Runtime API port, so several
SuperNodes can share a machine. Activation is refused by the SuperLink in two situations that look
the same from here: the key is not registered yet, or a previous session of this site is still
marked online (after a crash Flower keeps a node "online" for up to two heartbeat intervals, 60 s).
Both heal by waiting, so the launcher retries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.site_state import flwr_home
from server.processes import ManagedProcess, bin_dir, flower_env, free_port

ACTIVATION_FAILED = "Failed to activate SuperNode"
CERT_FAILED = "CERTIFICATE_VERIFY_FAILED"


@dataclass
class SuperNodeSpec:
    site_dir: Path
    server: str
    ca_cert: Path
    private_key: Path
    port: int = 0

    def args(self) -> list[str]:
        node_config = f"site-dir={json.dumps(str(self.site_dir))}"
        return [
            str(bin_dir() / "flower-supernode"),
            "--superlink", self.server,
            "--root-certificates", str(self.ca_cert),
            "--auth-supernode-private-key", str(self.private_key),
            "--node-config", node_config,
            "--port", str(self.port),
        ]  # fmt: skip


class JoinError(RuntimeError):
    pass


def start_supernode(
    spec: SuperNodeSpec, log_path: Path, extra_env: dict[str, str] | None = None
) -> ManagedProcess:
    if not spec.port:
        spec.port = free_port()
    env = flower_env(
        flwr_home(spec.site_dir), {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **(extra_env or {})}
    )
    return ManagedProcess("SuperNode", spec.args(), log_path, env=env, cwd=spec.site_dir).start()


def classify_exit(log_text: str) -> str:
    if ACTIVATION_FAILED in log_text:
        return "activation"
    if CERT_FAILED in log_text:
        return "certificate"
    return "other"


def run_supernode_forever(
    spec: SuperNodeSpec,
    log_path: Path,
    retry_s: float = 10.0,
    retry_for_s: float = 0.0,
    on_message: Callable[[str], None] = print,
    extra_env: dict[str, str] | None = None,
) -> int:
    """Run the SuperNode until it exits for a reason retrying cannot fix, or until interrupted.

    retry_for_s = 0 retries activation failures without limit.
    """
    t0 = time.monotonic()
    while True:
        offset = log_path.stat().st_size if log_path.exists() else 0
        proc = start_supernode(spec, log_path, extra_env)
        try:
            while proc.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.stop()
            return 130
        code = proc.returncode() or 0
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            text = f.read()
        kind = classify_exit(text)
        if kind == "certificate":
            raise JoinError(
                f"the coordinator's TLS certificate does not verify against {spec.ca_cert}: check --ca (the "
                "consortium's ca.crt) and that --server uses a host name listed in the certificate"
            )
        if kind != "activation":
            raise JoinError(f"the SuperNode exited with code {code}; see {log_path}")
        if retry_for_s and time.monotonic() - t0 > retry_for_s:
            raise JoinError(
                "the coordinator refused this site's node key: it is not registered (send keys/node_key.pub "
                "to the coordinator: `vilref-server add-site NAME --public-key node_key.pub`)"
            )
        on_message(
            "the coordinator refused this node (key not registered yet, or a previous session still marked "
            f"online for up to 60 s after a crash); retrying in {retry_s:.0f} s"
        )
        try:
            time.sleep(retry_s)
        except KeyboardInterrupt:
            return 130
