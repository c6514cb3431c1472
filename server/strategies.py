"""Flower strategies by name, configured from run.toml.

The round loop (server/federation.py) uses only a strategy's `configure_train` and `aggregate_train`,
so any Flower message-API strategy (and the DP wrappers around them) plugs in unchanged. Weighting is
by the `num-examples` metric of each reply, as in the FedAvg paper. Evaluation messages are never
sent (fraction_evaluate = 0): sites report validation metrics inside the train reply, which saves a
full message cycle per round (DESIGN.md §5).
"""

from __future__ import annotations

from typing import Any

from server.protocol import NUM_EXAMPLES
from server.run_config import RunConfig


def build_strategy(cfg: RunConfig) -> Any:
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

    s = cfg.strategy
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.sites.min_sites,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.sites.min_sites,
        weighted_by_key=NUM_EXAMPLES,
    )
    name = s.name
    if name == "fedavg":
        strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=s.proximal_mu)
    elif name == "fedadam":
        strategy = FedAdam(**common, eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, beta=s.trim_beta)
    else:  # validated by RunConfig; kept for callers that bypass it
        raise ValueError(f"unknown strategy {name!r}")
    return strategy
