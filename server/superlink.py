"""Launching the coordinator's SuperLink the only safe way, and knowing when it is ready.

The flags are not optional (DESIGN.md §5): TLS with our certificate, SuperNode authentication,
runtime dependency installation off (otherwise Flower runs `uv sync` and downloads a CUDA torch),
state in a database file (so registered hospitals and runs survive a restart), telemetry and update
checks off through the environment. Readiness is an HTTPS request verified against the consortium
CA: it proves the port is open, the certificate chain and SANs are right, and the app started.
"""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path

from server.consortium import CONNECTION_NAME, Consortium
from server.flower_cli import FlowerCLI, write_connection
from server.processes import ManagedProcess, ProcessStartError, bin_dir, flower_env, port_is_free

READY_TIMEOUT_S = 60.0


def superlink_args(c: Consortium, host: str, port: int) -> list[str]:
    return [
        str(bin_dir() / "flower-superlink"),
        "--ssl-ca-certfile",
        str(c.ca_cert),
        "--ssl-certfile",
        str(c.server_cert),
        "--ssl-keyfile",
        str(c.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(c.superlink_db),
        "--host",
        host,
        "--port",
        str(port),
    ]


def https_ready(address: str, ca_cert: Path, timeout: float = 2.0) -> bool:
    """True when an HTTPS request to `address` completes with a certificate valid for that host."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def plaintext_rejected(address: str, timeout: float = 3.0) -> bool:
    """True when a plaintext HTTP request to `address` gets no HTTP answer (TLS-only listener)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return False
    except (TimeoutError, OSError, http.client.HTTPException):
        return True
    finally:
        conn.close()


class SuperLink:
    """A running SuperLink for one consortium, plus a CLI bound to it."""

    def __init__(self, consortium: Consortium, host: str, port: int, connect_host: str = "127.0.0.1") -> None:
        self.c = consortium
        self.host = host
        self.port = port
        self.address = f"{connect_host}:{port}"
        self.proc = ManagedProcess(
            "SuperLink",
            superlink_args(consortium, host, port),
            consortium.logs / "superlink.log",
            env=flower_env(consortium.flwr_home),
            cwd=consortium.superlink_dir,
        )
        self.cli = FlowerCLI(consortium.flwr_home, CONNECTION_NAME)

    def start(self, timeout: float = READY_TIMEOUT_S) -> SuperLink:
        if not port_is_free(self.port, "127.0.0.1" if self.host in ("0.0.0.0", "127.0.0.1") else self.host):
            raise ProcessStartError(
                f"port {self.port} is already in use; is another coordinator running? "
                "Stop it, or set server.port in run.toml"
            )
        write_connection(self.c.flwr_home, CONNECTION_NAME, self.address, self.c.ca_cert)
        self.proc.start()
        t0 = time.monotonic()
        self.proc.wait_until(
            lambda: https_ready(self.address, self.c.ca_cert), timeout, "accept TLS connections"
        )
        self.startup_s = time.monotonic() - t0
        return self

    def alive(self) -> bool:
        return self.proc.alive()

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()
