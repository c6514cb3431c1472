"""Site-level differential privacy accounting: the unit protected is one whole hospital.

Each federated round with site-level DP releases `(sum of clipped site updates + N(0, sigma^2 C^2)) / m`:
a Gaussian mechanism with noise multiplier `sigma` on a sum whose sensitivity to adding or removing one
site is `C`. Rounds compose; Renyi DP composes them tightly and converts to an (epsilon, delta) statement.

Why Opacus's RDP analysis and not Flower's `RdpAccountant`: Flower's wraps Google's `dp-accounting`
package (the `flwr[dp]` extra), which is not part of our pinned stack; Opacus (already pinned) ships the
same sampled-Gaussian RDP analysis (Mironov et al. 2019) under the add/remove-one relation, which is
exactly the relation we claim. No new dependency.

Sampling: `sample_rate` q is the probability that a site takes part in a round under *Poisson* sampling.
Flower's strategies sample a fixed number of sites without replacement and the coordinator knows who
answered, so the coordinator's accounting uses q = 1 (no amplification) — see docs/privacy.md. The
q < 1 path exists for planning ("what if 10 of 100 hospitals were Poisson-sampled each round?").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTING_METHOD = "rdp"
NEIGHBOURING_RELATION = "add-or-remove-one-site"


@dataclass(frozen=True)
class RoundPrivacy:
    """The privacy record of one federated round: what the coordinator stores and shows per round.

    `epsilon_round` is the cost of this round's release alone; `epsilon_cumulative` composes every
    release of the run so far (the number that matters for the final model).
    """

    server_round: int
    mechanism: str
    unit: str
    noise_multiplier: float
    clipping_norm: float
    sites_sampled: int
    sites_aggregated: int
    population: int
    sample_rate: float
    delta: float
    epsilon_round: float
    epsilon_cumulative: float
    released: bool
    accounting: str = ACCOUNTING_METHOD
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be strictly between 0 and 1, got {delta!r}")


def _check_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def _epsilon(acc: RDPAccountant, delta: float) -> float:
    # Opacus warns when the optimum sits at the edge of its order grid (tiny or huge epsilon); the bound
    # is still a valid upper bound, only looser, so the warning is noise in a coordinator's log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta))


def site_level_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon after `rounds` releases of a Gaussian mechanism with this noise multiplier.

    This is the number a consortium quotes before a run ("sigma=1.0 for 20 rounds gives epsilon=...").
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_delta(delta)
    _check_rate(sample_rate)
    if rounds <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return _epsilon(acc, delta)


def site_level_noise_multiplier(
    target_epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps `rounds` releases within the budget."""
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(delta)
    _check_rate(sample_rate)
    if rounds <= 0:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=int(rounds),
            accountant=ACCOUNTING_METHOD,
        )
    )


class SiteLevelAccountant:
    """Cumulative (epsilon, delta) of a federated run with site-level DP, one release per round.

    Its state is a JSON-able list of releases, so the coordinator can persist it with the round and
    `--resume` continues the same budget instead of silently restarting it at zero.
    """

    def __init__(self, delta: float, max_epsilon: float | None = None) -> None:
        _check_delta(delta)
        if max_epsilon is not None:
            _check_positive("max_epsilon", max_epsilon)
        self.delta = float(delta)
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self._releases: list[tuple[int, float, float]] = []  # (round, noise multiplier, sample rate)

    @property
    def num_releases(self) -> int:
        return len(self._releases)

    def _epsilon_of(self, releases: list[tuple[int, float, float]], delta: float) -> float:
        if not releases:
            return 0.0
        acc = RDPAccountant()
        for _, sigma, rate in releases:
            acc.step(noise_multiplier=sigma, sample_rate=rate)
        return _epsilon(acc, delta)

    def epsilon(self, delta: float | None = None) -> float:
        """Cumulative epsilon of every release so far at `delta` (default: the run's delta)."""
        return self._epsilon_of(self._releases, self.delta if delta is None else delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float = 1.0) -> bool:
        """Whether one more release would take the run past `max_epsilon` (False without a limit)."""
        if self.max_epsilon is None:
            return False
        projected = [*self._releases, (-1, float(noise_multiplier), float(sample_rate))]
        return self._epsilon_of(projected, self.delta) > self.max_epsilon

    def record_release(
        self, server_round: int, noise_multiplier: float, sample_rate: float = 1.0
    ) -> tuple[float, float]:
        """Compose one round's release; returns (epsilon of this round alone, cumulative epsilon)."""
        _check_positive("noise_multiplier", noise_multiplier)
        _check_rate(sample_rate)
        self._releases.append((int(server_round), float(noise_multiplier), float(sample_rate)))
        eps_round = self._epsilon_of([self._releases[-1]], self.delta)
        return eps_round, self.epsilon()

    def state_dict(self) -> dict[str, Any]:
        return {
            "accounting": ACCOUNTING_METHOD,
            "relation": NEIGHBOURING_RELATION,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "releases": [list(r) for r in self._releases],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a persisted budget; refuses a state made under another delta (it would misreport)."""
        if state.get("accounting") != ACCOUNTING_METHOD or state.get("relation") != NEIGHBOURING_RELATION:
            raise ValueError("privacy accountant state was written by a different accounting method")
        if float(state.get("delta", -1.0)) != self.delta:
            raise ValueError(
                f"privacy accountant state was accounted at delta={state.get('delta')}, "
                f"this run uses delta={self.delta}; keep the run's delta when resuming"
            )
        self._releases = [(int(r), float(s), float(q)) for r, s, q in state.get("releases", [])]
