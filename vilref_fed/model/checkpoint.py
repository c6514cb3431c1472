"""What leaves a site, and the model file a consortium exports.

`shared_state_dict` is exactly what travels in federation: the online towers, projections and the
logit scale. Momentum encoders and queues live in the trainer's memory module, not in the model,
so they can never be sent by accident. Integer buffers (BatchNorm batch counters, position ids)
do not travel either: averaging them is meaningless.

`save_checkpoint` / `load_checkpoint` write the exported model used for screening: weights plus
the architecture and the metadata needed to use them correctly (ontology hash, prompt language,
decision thresholds).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilref_fed.model.dual_encoder import TOWER_MODULES, ViLReFModel, build_model

CHECKPOINT_FORMAT = "vilref-fed-model"
CHECKPOINT_VERSION = 1
SHARED_PREFIXES = tuple(f"{m}." for m in TOWER_MODULES)


def unwrap(model: nn.Module) -> nn.Module:
    """The ViLReFModel inside a DDP / Opacus wrapper (both keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_shared_key(key: str) -> bool:
    return key == "logit_scale" or key.startswith(SHARED_PREFIXES)


def shared_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Online towers + projections + logit scale (floating tensors only), detached CPU copies."""
    sd = unwrap(model).state_dict()
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in sd.items()
        if _is_shared_key(k) and torch.is_floating_point(v)
    }


def load_shared_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy shared weights into `model` in place; refuses any missing, extra or mis-shaped entry.

    Strict on purpose: a site running a different architecture or config must fail loudly,
    not silently train half a model.
    """
    target = unwrap(model)
    own = {k: v for k, v in target.state_dict().items() if _is_shared_key(k) and torch.is_floating_point(v)}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"shared weights do not match this model (missing {len(missing)}: {missing[:3]}, "
            f"unexpected {len(extra)}: {extra[:3]}); check that every site uses the same model config"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"shared weight {k} has shape {tuple(state[k].shape)}, this model expects {tuple(v.shape)}"
            )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(torch.as_tensor(state[k]).to(device=v.device, dtype=v.dtype))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Exported model file: {"format", "version", "model_config", "state_dict", "meta"}.

    `extra` holds plain values (str, numbers, lists, dicts): e.g. ontology_hash, prompt_language,
    thresholds {label_id: float}, training metrics. It is stored as the checkpoint's meta.
    """
    m = unwrap(model)
    if not isinstance(m, ViLReFModel):
        raise TypeError("save_checkpoint expects a ViLReFModel")
    meta = dict(extra or {})
    meta.pop("model_config", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": m.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "meta": meta,
    }
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint payload, checked to be ours (weights_only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickled code
        raise ValueError(
            f"{path} is not a readable vilref-fed model checkpoint ({type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vilref-fed model checkpoint (wrong or missing format tag)")
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} was written by a newer vilref-fed (checkpoint version {payload.get('version')}); upgrade"
        )
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[ViLReFModel, dict]:
    """(model, meta): the model rebuilt from its stored config with its weights; meta holds
    "model_config" plus everything passed as `extra` when saving."""
    payload = read_checkpoint(path)
    model = build_model(payload["model_config"], pretrained=False)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    # Non-persistent buffers are never saved; anything else missing means a different architecture.
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {path} does not match its own model config "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.to(map_location)
    meta = dict(payload.get("meta", {}))
    meta["model_config"] = payload["model_config"]
    return model, meta
