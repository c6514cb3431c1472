"""The environment every vilref-fed process runs with: offline, no telemetry, no update checks.

Hospitals do not phone home, and a model hub lookup at run time would either leak that a site is
running or hang for ~25 s of retries on a closed network. Every process the toolkit starts gets
`child_env()`; the current process gets the same values through `apply_offline_env()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Force the offline settings into this process (overriding any inherited opt-in)."""
    os.environ.update(OFFLINE_ENV)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess: the parent's, with the offline settings forced on top."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    if extra:
        env.update(extra)
    return env
