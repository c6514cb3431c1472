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


# ---- parameter packing
# Flower sends every array of an ArrayRecord as its own object (one HTTP request and one database
# row each, fetched with exponential back-off when a puller is early): with the tiny model's 78
# tensors a round trip took 11-15 s on loopback where the same bytes as one vector took 5 s
# (bench/federation.py, docs/benchmarks.md). So the shared parameters travel packed: one flat vector
# per dtype, in the order of a spec both sides derive from their own model. Every strategy we offer
# is element-wise (means, medians, trimmed means, Adam moments, DP clipping by the global norm), so
# packing changes nothing in the arithmetic.
PARAM_SPEC_HASH = "param-spec-hash"
PACKED_PREFIX = "params."

ParamSpec = list[tuple[str, tuple[int, ...], str]]


def param_spec(state: Any) -> ParamSpec:
    """(name, shape, dtype) of every shared parameter, sorted by name."""
    out: ParamSpec = []
    for name in sorted(state):
        v = state[name]
        dtype = str(v.dtype).replace("torch.", "")
        out.append((name, tuple(int(d) for d in v.shape), dtype))
    return out


def spec_hash(spec: ParamSpec) -> str:
    blob = json.dumps([[n, list(s), d] for n, s, d in spec], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pack(state: Any, spec: ParamSpec) -> dict[str, Any]:
    """{'params.<dtype>': 1-D numpy array} in spec order; `state` maps names to tensors or arrays."""
    import numpy as np

    groups: dict[str, list[Any]] = {}
    for name, shape, dtype in spec:
        v = state[name]
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if tuple(a.shape) != shape or str(a.dtype) != dtype:
            raise ValueError(f"parameter {name} is {tuple(a.shape)}/{a.dtype}, the spec says {shape}/{dtype}")
        groups.setdefault(dtype, []).append(a.reshape(-1))
    return {PACKED_PREFIX + d: np.concatenate(parts) for d, parts in sorted(groups.items())}


def packed_shapes(spec: ParamSpec) -> dict[str, tuple[int]]:
    sizes: dict[str, int] = {}
    for _, shape, dtype in spec:
        sizes[dtype] = sizes.get(dtype, 0) + _numel(shape)
    return {PACKED_PREFIX + d: (n,) for d, n in sorted(sizes.items())}


def unpack(packed: Any, spec: ParamSpec) -> dict[str, Any]:
    """Named arrays (views into the packed vectors) from `pack`'s output; checks every size."""
    expected = packed_shapes(spec)
    if set(packed) != set(expected):
        raise ValueError(f"packed arrays {sorted(packed)} do not match the parameter spec {sorted(expected)}")
    offsets = dict.fromkeys(expected, 0)
    out: dict[str, Any] = {}
    for name, shape, dtype in spec:
        key = PACKED_PREFIX + dtype
        vec = packed[key]
        if tuple(vec.shape) != expected[key] or str(vec.dtype) != dtype:
            raise ValueError(
                f"packed array {key} is {tuple(vec.shape)}/{vec.dtype}, expected {expected[key]}/{dtype}"
            )
        n = _numel(shape)
        out[name] = vec[offsets[key] : offsets[key] + n].reshape(shape)
        offsets[key] += n
    return out


def locate(spec: ParamSpec, key: str, index: int) -> str:
    """The parameter name at position `index` of packed vector `key` (for error messages)."""
    dtype = key[len(PACKED_PREFIX) :]
    pos = 0
    for name, shape, d in spec:
        if d != dtype:
            continue
        n = _numel(shape)
        if index < pos + n:
            return name
        pos += n
    return key


PARAM_SPEC = "param-spec"  # the spec as JSON, sent with every instruction (server -> site only)


def spec_to_json(spec: ParamSpec) -> str:
    return json.dumps([[n, list(s), d] for n, s, d in spec], separators=(",", ":"))


def spec_from_json(text: str) -> ParamSpec:
    return [(str(n), tuple(int(x) for x in s), str(d)) for n, s, d in json.loads(text)]
