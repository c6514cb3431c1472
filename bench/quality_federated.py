"""The `federated_wscl` row of bench/quality.py: FedAvg over the three synthetic hospitals.

Why in-process and not over Flower: the quality table measures what federation does to *learning*
(non-IID sites, averaged weights, site-local momentum encoders and queues), and repeats it over
several seeds. The transport adds ~20 s of fixed overhead per round (docs/benchmarks.md,
Federation) and no arithmetic, and it is covered by the real SuperLink/SuperNode end-to-end tests.
The arithmetic here is the production one: each site keeps its own LocalTrainer (optimiser, momentum
encoder, memory queues = site state that never travels), loads the global shared parameters
(`load_shared_state_dict`) at the start of each round, trains locally, and the server takes the
example-weighted mean of `shared_state_dict` (FedAvg, our default strategy).

Budget: the same total number of optimiser steps as the centralised rows (`ctx.steps`), split
evenly over sites and rounds, so every row costs the same compute.
"""

from __future__ import annotations

from typing import Any

ROUNDS = 4


def train(ctx: Any) -> Any:
    import torch

    from vilref_fed.model import load_shared_state_dict, shared_state_dict
    from vilref_fed.train import LocalTrainer

    global_model = ctx.new_model()
    names = list(ctx.sites)
    steps_per_round = max(1, ctx.steps // (len(names) * ROUNDS))
    trainers: dict[str, LocalTrainer] = {}
    for i, name in enumerate(names):
        torch.manual_seed(ctx.seed * 100 + i)
        local = ctx.new_model()
        trainers[name] = LocalTrainer(local, ctx.train_config.replace(objective="wscl", seed=ctx.seed + i))
    weights = {n: float(len(ctx.sites[n])) for n in names}
    total = sum(weights.values())
    for _ in range(ROUNDS):
        shared = shared_state_dict(global_model)
        updates: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            tr = trainers[name]
            load_shared_state_dict(tr.model, shared)
            tr.fit(ctx.sites[name], max_steps=steps_per_round, progress=False)
            updates[name] = {k: v.detach().clone() for k, v in shared_state_dict(tr.model).items()}
        averaged = {
            k: sum(updates[n][k] * (weights[n] / total) for n in names).to(shared[k].dtype) for k in shared
        }
        load_shared_state_dict(global_model, averaged)
    return global_model
