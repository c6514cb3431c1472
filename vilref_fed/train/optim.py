"""AdamW (or SGD) with CLIP's decay rule, and the warm-up + cosine learning-rate schedule.

The schedule is a pure function of the optimiser step and a plan (start, end), not a stateful
scheduler object: resuming exactly then needs only the step counter and the plan, which the
trainer saves, and nothing can drift between a fresh and a resumed run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vilref_fed.train.config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and the logit scale are not decayed (decay would fight their role)."""
    lowered = name.lower()
    return (
        param.ndim < 2
        or lowered.endswith(".bias")
        or "norm" in lowered
        or ".bn" in lowered
        or "logit_scale" in lowered
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (keep if no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lr_at(step: int, config: TrainConfig, plan_start: int, plan_end: int) -> float:
    """Learning rate for optimiser step `step` (0-based).

    Warm-up is linear over the run's first `warmup_steps` steps; the cosine then runs from the
    later of (plan start, end of warm-up) to the plan end and stays at its floor beyond it.
    """
    base = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return base
    start = max(plan_start, config.warmup_steps)
    span = plan_end - start
    progress = 1.0 if span <= 0 else min(max((step - start) / span, 0.0), 1.0)
    floor = config.min_lr_ratio
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
