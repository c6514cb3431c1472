"""The federation's wire protocol: what the coordinator sends each round and what a site may answer.

Shared by the ServerApp and the ClientApp (both import this small module), so the key names cannot
drift apart. The reply is deliberately narrow: one ArrayRecord holding exactly the shared model
parameters (online towers, projections, logit scale) and one MetricRecord of scalar metrics. The
server rejects anything else, and records the shape of every reply it receives (logs/wire-audit.jsonl).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

# ---- keys of the train instruction's ConfigRecord ("config")
ROUND = "server-round"  # set by Flower's strategies
RUN_UID = "run-uid"
TOOLKIT_VERSION = "toolkit-version"
ONTOLOGY_HASH = "ontology-hash"
MODEL_NAME = "model-name"
MODEL_CONFIG_HASH = "model-config-hash"
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
EVALUATE = "evaluate"
PROMPT_LANGUAGE = "prompt-language"
SEED = "seed"
PROXIMAL_MU = "proximal-mu"  # set by FedProx
TRAIN_PREFIX = "train."

# ---- record keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ---- reply metrics (scalars only). The same keys in every reply of a round.
NUM_EXAMPLES = "num-examples"
REPLY_METRICS: tuple[str, ...] = (
    NUM_EXAMPLES,
    "train_loss",
    "train_steps",
    "setup_s",
    "train_s",
    "eval_s",
    "val_examples",
    "val_macro_auc",
    "val_map",
)
MAX_METRIC_NAME = max(len(k) for k in REPLY_METRICS)


class SiteRefusal(RuntimeError):
    """A site declines a round (ontology, model config or toolkit mismatch). Its message travels
    back to the coordinator as the reply's error reason, so it must say what differs and what to do,
    and must never contain patient data."""


def config_hash(config: Any) -> str:
    """sha256 of a model configuration as canonical JSON (dataclass or mapping)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    elif isinstance(config, dict):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        data = dict(vars(config))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def compatible_versions(a: str, b: str) -> bool:
    """Sites and coordinator must run the same major.minor toolkit version (the wire format)."""
    return a.split(".")[:2] == b.split(".")[:2]


def refusal_reason(error_reason: str) -> str:
    """The human message inside Flower's `"<class '...'>:<'message'>"` error reason."""
    s = error_reason or ""
    if ":<'" in s and s.endswith("'>"):
        return s.split(":<'", 1)[1][:-2]
    return s
