"""Talking to a running SuperLink through Flower's supported CLI (`flwr ...`), with our FLWR_HOME.

The connection lives in `$FLWR_HOME/config.toml` (a `[superlink.vilref]` section with the address
and the CA certificate). It is always a real address: never `:local:`, which would start a detached
SuperLink that installs dependencies at run time. Every command runs with `--format json` and a
timeout, and failures become FlowerCLIError with Flower's own message.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.processes import bin_dir, flower_env


class FlowerCLIError(RuntimeError):
    pass


def write_connection(
    flwr_home: Path, name: str, address: str, ca_cert: Path | None, insecure: bool = False
) -> Path:
    """Write (replace) `$FLWR_HOME/config.toml` with one connection and make it the default."""
    if address.startswith(":"):
        raise ValueError("refusing a ':local:' style connection; give host:port of our SuperLink")
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        if ca_cert is None:
            raise ValueError("a TLS connection needs the CA certificate")
        lines.append(f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}")
    path = flwr_home / "config.toml"
    tmp = path.with_name("config.toml.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass
class FlowerCLI:
    flwr_home: Path
    connection: str
    timeout_s: float = 60.0

    def _run(self, *args: str, check: bool = True) -> dict[str, Any]:
        cmd = [str(bin_dir() / "flwr"), *args, "--format", "json"]
        try:
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                env=flower_env(self.flwr_home),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise FlowerCLIError(f"`flwr {args[0]}` did not answer within {self.timeout_s:.0f} s") from None
        payload: dict[str, Any] = {}
        text = out.stdout.strip()
        start = text.find("{")
        if start >= 0:
            try:
                payload = json.loads(text[start:])
            except json.JSONDecodeError:
                payload = {}
        if check and (out.returncode != 0 or not payload.get("success", False)):
            msg = (
                payload.get("error-message")
                or out.stderr.strip()
                or out.stdout.strip()
                or f"exit {out.returncode}"
            )
            raise FlowerCLIError(f"`flwr {' '.join(args[:2])}` failed: {_last_line(msg)}")
        return payload

    def register_node(self, public_key: Path, name: str) -> str:
        res = self._run("supernode", "register", str(public_key), self.connection, "--name", name)
        return str(res["node-id"])

    def unregister_node(self, node_id: str) -> None:
        self._run("supernode", "unregister", str(node_id), self.connection)

    def list_nodes(self) -> list[dict[str, Any]]:
        return list(self._run("supernode", "list", self.connection).get("nodes", []))

    def submit_run(self, app_dir: Path, run_config: dict[str, Any]) -> str:
        overrides = " ".join(f"{k}={_config_value(v)}" for k, v in run_config.items())
        args = ["run", str(app_dir), self.connection]
        if overrides:
            args += ["--run-config", overrides]
        res = self._run(*args)
        return str(res["run-id"])

    def list_runs(self) -> list[dict[str, Any]]:
        return list(self._run("list", self.connection).get("runs", []))

    def run_status(self, run_id: str) -> str | None:
        """Flower's status of a run, e.g. `running` or `finished:completed` / `finished:failed`."""
        res = self._run("list", self.connection, "--run-id", str(run_id), check=False)
        for r in res.get("runs", []):
            if str(r.get("run-id")) == str(run_id):
                return str(r.get("status"))
        return None

    def stop_run(self, run_id: str) -> None:
        self._run("stop", str(run_id), self.connection, check=False)


def _config_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _last_line(msg: str) -> str:
    lines = [
        ln.strip() for ln in str(msg).splitlines() if ln.strip() and not ln.startswith("Using SuperLink")
    ]
    return " ".join(lines[-2:]) if lines else str(msg)
