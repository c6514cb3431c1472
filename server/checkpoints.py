"""Per-round checkpoints of the global model and of the server optimiser, for resume and export.

Written atomically (temporary file, fsync, rename) before the round is marked completed in the
database, so a coordinator killed at any instant leaves either the previous round or the new one,
never a half file that resume would trust. Only tensors and plain values are stored, so
`torch.load(weights_only=True)` reads them.

Server-optimiser state: FedAdam/FedYogi/FedAdagrad keep first/second moments (`m_t`, `v_t`), FedAvgM
keeps a momentum vector. Resuming without them would silently restart the optimiser.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

FORMAT = "vilref-fed/global-round/v1"
_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


class CheckpointError(RuntimeError):
    pass


def arrays_to_numpy(rec: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, a.numpy()) for k, a in rec.items())


def numpy_to_arrays(d: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.array(v, order="C", copy=True))) for k, v in d.items()))


def _to_tensor_tree(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (np.ndarray, np.generic)):  # numpy arithmetic on 0-d arrays yields scalars
        return torch.from_numpy(np.array(v, order="C", copy=True))
    if isinstance(v, dict):
        return {str(k): _to_tensor_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_tensor_tree(x) for x in v]
    if isinstance(v, ArrayRecord):
        return {k: torch.from_numpy(a.numpy().copy()) for k, a in v.items()}
    return v


def _to_numpy_tree(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return v.numpy()
    if isinstance(v, dict):
        return {k: _to_numpy_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_numpy_tree(x) for x in v]
    return v


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The server optimiser's state of a Flower strategy (empty for stateless ones like FedAvg)."""
    target = getattr(strategy, "strategy", strategy)  # unwrap DP-style wrappers
    return {
        a: _to_tensor_tree(getattr(target, a)) for a in _STATE_ATTRS if getattr(target, a, None) is not None
    }


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    target = getattr(strategy, "strategy", strategy)
    for a, v in state.items():
        if a not in _STATE_ATTRS:
            raise CheckpointError(f"unknown strategy state {a!r} in checkpoint")
        setattr(target, a, _to_numpy_tree(v))


def save_round_checkpoint(
    path: Path,
    round_no: int,
    named: Mapping[str, np.ndarray],
    strategy: Any,
    meta: dict[str, Any],
) -> Path:
    """`named`: the global weights by parameter name (unpacked), what export and resume read."""
    payload = {
        "format": FORMAT,
        "round": int(round_no),
        "arrays": OrderedDict(
            (k, torch.from_numpy(np.array(v, order="C", copy=True))) for k, v in named.items()
        ),
        "strategy_state": strategy_state(strategy),
        "meta": dict(meta),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_round_checkpoint(path: Path) -> dict[str, Any]:
    """{'round', 'arrays': OrderedDict[str, Tensor], 'strategy_state', 'meta'}; validates the format."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as err:  # corrupt or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(err).__name__}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vilref-fed round checkpoint")
    return data


def checkpoint_arrays(data: dict[str, Any]) -> OrderedDict[str, np.ndarray]:
    """The checkpoint's global weights by parameter name."""
    return OrderedDict((k, t.numpy()) for k, t in data["arrays"].items())
