"""The global model on the coordinator: its initial weights, its config hash, and the exported file.

The coordinator never trains; it only needs the architecture to create round-0 weights (seeded, so
a run is reproducible) and to turn a round checkpoint into the model file that `vilref-client
screen`/`eval` load (`vilref_fed.model.save_checkpoint`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from server.protocol import config_hash


def model_config_hash(model_name: str) -> str:
    """Hash of the named model configuration, as every site computes it from its own install."""
    from vilref_fed.model import load_model_config

    return config_hash(load_model_config(model_name).to_dict())


def build_global_model(model_name: str, seed: int) -> Any:
    import torch

    from vilref_fed.model import build_model

    torch.manual_seed(int(seed))
    return build_model(model_name, pretrained=True)


def initial_state(model_name: str, seed: int) -> OrderedDict[str, Any]:
    """Round-0 weights, named: the shared part of a freshly built model (pretrained towers where the
    configuration names offline weights), as numpy arrays."""
    from vilref_fed.model import shared_state_dict

    model = build_global_model(model_name, seed)
    return OrderedDict((k, v.numpy()) for k, v in sorted(shared_state_dict(model).items()))


def initial_arrays(model_name: str, seed: int) -> Any:
    """Round-0 weights as the packed ArrayRecord that travels (server/protocol.py)."""
    from server.checkpoints import numpy_to_arrays
    from server.protocol import pack, param_spec

    state = initial_state(model_name, seed)
    return numpy_to_arrays(pack(state, param_spec(state)))


def export_model(arrays: OrderedDict[str, Any], model_name: str, out: Path, meta: dict[str, Any]) -> Path:
    """Write a vilref-fed model checkpoint (what `vilref-client` loads) from round weights."""
    import torch

    from vilref_fed.model import build_model, load_shared_state_dict, save_checkpoint

    model = build_model(model_name, pretrained=False)
    load_shared_state_dict(model, {k: torch.as_tensor(v) for k, v in arrays.items()})
    return save_checkpoint(out, model, extra=meta)
