"""Federated supervised-head runs (`[run] task = "head"`): what the coordinator starts from and sends.

A head run trains a multi-label head on every site's report-extracted labels, on the image tower of a
global model (frozen, or fine-tuned with `[train] mode = "finetune"`), optionally with patient-level
DP-SGD at each site (`[privacy] patient-dp = true`). It is the federated objective on which a
per-patient epsilon is a true statement (docs/privacy.md). The round loop, the update checks, FedAvg
and site-level DP are the same as for pre-training; only the arrays and the site's training differ.

`[train]` of a head run holds head settings: mode, feature, epochs, batch_size, lr, momentum,
weight_decay, max_images_per_patient, and optionally base_checkpoint (a model file exported from a
pre-training run; default: the configured model's own initial weights).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

TASK = "task"
TOTAL_ROUNDS = "rounds"
DP_PREFIX = "dp."
HEAD_TRAIN_KEYS = (
    "mode", "feature", "epochs", "batch_size", "lr", "momentum", "weight_decay", "max_images_per_patient",
    "base_checkpoint",
)  # fmt: skip


class HeadTaskError(ValueError):
    """A head run's settings are wrong (the message names the key)."""


def check_head_train_section(train: dict[str, Any]) -> None:
    """Refuse unknown [train] keys in a head run (a pre-training key there is a mistake)."""
    unknown = sorted(set(train) - set(HEAD_TRAIN_KEYS))
    if unknown:
        raise HeadTaskError(
            f"[train] of a task = 'head' run does not take {', '.join(unknown)}; "
            f"head settings are: {', '.join(HEAD_TRAIN_KEYS)}"
        )
    from vilref_fed.train.head import HeadConfig

    values = {k: v for k, v in train.items() if k != "base_checkpoint"}
    try:
        HeadConfig(**values).validate()
    except (TypeError, ValueError) as err:
        raise HeadTaskError(f"[train] of the head run: {err}") from None


def head_round_config(cfg: Any) -> dict[str, Any]:
    """Keys added to every train instruction of a head run: the task, the run length (the site solves
    its DP noise for the whole run) and the patient-level DP settings."""
    out: dict[str, Any] = {TASK: "head", TOTAL_ROUNDS: int(cfg.run.rounds)}
    privacy = cfg.privacy_config()
    if privacy.patient_dp:
        out[DP_PREFIX + "max-grad-norm"] = float(privacy.max_grad_norm)
        if privacy.patient_epsilon is not None:
            out[DP_PREFIX + "epsilon"] = float(privacy.patient_epsilon)
        if privacy.patient_noise_multiplier is not None:
            out[DP_PREFIX + "noise-multiplier"] = float(privacy.patient_noise_multiplier)
        if privacy.patient_delta is not None:
            out[DP_PREFIX + "delta"] = float(privacy.patient_delta)
    return out


def initial_head_record(cfg: Any) -> Any:
    """Round-0 arrays of a head run: a zero head plus the image encoder (sent even when frozen, so every
    site computes its features with the same tower)."""
    import torch
    from flwr.app import ArrayRecord

    from server.global_model import build_global_model
    from vilref_fed.ontology import load_ontology
    from vilref_fed.train.head import initial_head_arrays

    base = str(cfg.train.get("base_checkpoint", "") or "")
    if base:
        from vilref_fed.model import load_checkpoint

        try:
            model, _meta = load_checkpoint(base)
        except (OSError, ValueError, RuntimeError) as err:
            raise HeadTaskError(f"[train] base_checkpoint {base} cannot be loaded: {err}") from None
    else:
        model = build_global_model(cfg.run.model, cfg.run.seed)
    arrays = initial_head_arrays(
        model,
        num_labels=len(load_ontology().label_ids),
        mode=str(cfg.train.get("mode", "frozen")),
        feature=str(cfg.train.get("feature", "backbone")),
        include_encoder=True,
    )
    return ArrayRecord(OrderedDict(sorted((k, torch.as_tensor(v)) for k, v in arrays.items())))
