"""Site-level accountant against an obviously-correct reference: the exact privacy profile of the
Gaussian mechanism (T releases with multiplier sigma = one release with sigma / sqrt(T); Balle & Wang
2018)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from vilref_fed.privacy.accounting import SiteLevelAccountant, site_level_epsilon, site_level_noise_multiplier


def exact_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for `rounds` Gaussian releases (no sampling)."""
    mu = math.sqrt(rounds) / sigma

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma, rounds", [(0.8, 1), (1.0, 10), (2.0, 50), (5.0, 3), (1.2, 200)])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_epsilon_is_a_valid_and_tight_upper_bound(sigma, rounds, delta):
    exact = exact_gaussian_epsilon(sigma, rounds, delta)
    ours = site_level_epsilon(sigma, rounds, delta)
    assert exact <= ours <= 1.2 * exact


def test_accountant_composes_rounds_like_one_long_run_and_persists():
    acc = SiteLevelAccountant(delta=1e-5)
    for rnd in range(1, 6):
        eps_round, eps_total = acc.record_release(rnd, 1.3)
        assert eps_round == pytest.approx(site_level_epsilon(1.3, 1, 1e-5))
        assert eps_total == pytest.approx(site_level_epsilon(1.3, rnd, 1e-5))
    restored = SiteLevelAccountant(delta=1e-5)
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon() == pytest.approx(acc.epsilon()) and restored.num_releases == 5
    with pytest.raises(ValueError, match="keep the run's delta"):
        SiteLevelAccountant(delta=1e-6).load_state_dict(acc.state_dict())


def test_mixed_noise_and_poisson_sampling():
    acc = SiteLevelAccountant(delta=1e-5)
    acc.record_release(1, 1.0)
    acc.record_release(2, 2.0)
    assert site_level_epsilon(2.0, 2, 1e-5) < acc.epsilon() < site_level_epsilon(1.0, 2, 1e-5)
    # Poisson sampling of 10 % of sites amplifies: far less than the unsampled epsilon.
    assert site_level_epsilon(1.0, 10, 1e-5, sample_rate=0.1) < 0.3 * site_level_epsilon(1.0, 10, 1e-5)


def test_noise_multiplier_for_a_budget_round_trips():
    sigma = site_level_noise_multiplier(8.0, rounds=20, delta=1e-5)
    assert site_level_epsilon(sigma, 20, 1e-5) <= 8.0
    assert site_level_epsilon(sigma * 0.97, 20, 1e-5) > 7.5


def test_budget_limit_and_input_checks():
    acc = SiteLevelAccountant(delta=1e-5, max_epsilon=site_level_epsilon(1.0, 2, 1e-5) * 1.001)
    assert not acc.would_exceed(1.0)
    acc.record_release(1, 1.0)
    acc.record_release(2, 1.0)
    assert acc.would_exceed(1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise_multiplier must be a positive"):
            site_level_epsilon(bad, 3, 1e-5)
    with pytest.raises(ValueError, match="delta must be strictly between"):
        SiteLevelAccountant(delta=1.0)
    assert site_level_epsilon(1.0, 0, 1e-5) == 0.0
