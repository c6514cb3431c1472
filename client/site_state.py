"""What a site keeps for federation, all inside its site directory (nothing here ever leaves it).

    SITE/keys/node_key(.pub)        the SuperNode's ECDSA key pair (the .pub goes to the coordinator)
    SITE/state/federation/RUN_UID/  momentum encoders, memory queues, optimiser moments of one run
                                    (LocalTrainer's site_state.pt), kept between rounds
    SITE/flwr_home/                 FLWR_HOME of this site's SuperNode (installed app bundles)
    SITE/logs/federation.log        one line per round: counts, timings and reasons only
    SITE/train.toml (optional)      site-local training settings (batch size, device, workers)

Per-run state: a new consortium run starts from fresh momentum encoders and queues, while a resumed
run (same run uid) continues with the state the site had after its last round.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from sqlalchemy import text

KEYS_DIR = "keys"
FLWR_HOME_DIR = "flwr_home"
FED_STATE_DIR = "federation"
FED_LOG = "federation.log"
SITE_TRAIN_TOML = "train.toml"
_RUN_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Training settings a site decides for itself (hardware); every other TrainConfig field comes from
#: the coordinator so all sites optimise the same objective.
SITE_LOCAL_TRAIN_KEYS = frozenset(
    {"device", "num_workers", "amp", "amp_dtype", "batch_size", "grad_accum", "log_every"}
)


def node_key_dir(site_dir: Path) -> Path:
    return Path(site_dir) / KEYS_DIR


def flwr_home(site_dir: Path) -> Path:
    return Path(site_dir) / FLWR_HOME_DIR


def federation_state_dir(state_dir: Path, run_uid: str) -> Path:
    """The site-state directory of one consortium run (validated: the uid comes over the wire)."""
    if not _RUN_UID_RE.match(run_uid or ""):
        raise ValueError(f"invalid run uid {run_uid!r}")
    d = Path(state_dir) / FED_STATE_DIR / run_uid
    d.mkdir(parents=True, exist_ok=True)
    return d


def label_ontology_hashes(engine: object) -> set[str]:
    """Ontology hashes the site's training labels were extracted with (empty before ingestion)."""
    with engine.connect() as conn:  # type: ignore[attr-defined]
        try:
            rows = conn.execute(text("SELECT DISTINCT ontology_hash FROM image_reports")).all()
        except Exception:  # no label table yet: nothing ingested
            return set()
    return {str(r[0]) for r in rows if r[0]}


def append_federation_log(logs_dir: Path, line: str) -> None:
    """One line per event for hospital IT; callers pass counts, timings and reasons only."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    with open(logs_dir / FED_LOG, "a", encoding="utf-8") as f:
        f.write(f"{stamp} {line}\n")
