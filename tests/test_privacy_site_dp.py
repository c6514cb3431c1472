"""Site-level DP on the coordinator: Flower 1.42's DP wrappers with our failure policy, equal weights,
correct adaptive noise, accounting, and the coordinator database record.

The replies are real Flower `Message`s; the strategies are Flower's, wrapped by server/privacy.py. The
only stand-in is `StaticGrid`, a Grid that lists fixed node ids (the real SuperLink grid is exercised by
the end-to-end test in test_privacy_e2e.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
)
from flwr.supercore.task_identity import TaskIdentity

from server.privacy import (
    KEY_EPSILON,
    SITE_CLIENT_ADAPTIVE,
    SITE_CLIENT_FIXED,
    SITE_SERVER_ADAPTIVE,
    SITE_SERVER_FIXED,
    PrivacyConfig,
    PrivacyConfigError,
    accountant_state_from_records,
    client_mods,
    load_round_privacy,
    privacy_summary,
    record_round_privacy,
    wrap_strategy,
)
from vilref_fed.privacy.accounting import site_level_epsilon
from vilref_fed.store.db import make_engine

D = 40_000  # parameters: enough to measure the noise's standard deviation to well under 2 %


class StaticGrid(Grid):
    """A Grid over a fixed set of node ids (only what configure_train uses)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._ids = list(node_ids)

    def set_run(self, run_id):  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self):
        return list(self._ids)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield


def _meta(node: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN,
    )


def _reply(node: int, weights: np.ndarray, num_examples: int = 10, extra: dict | None = None) -> Message:
    metrics = {"num-examples": num_examples, "train-loss": 1.0, **(extra or {})}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, metadata=_meta(node))


def _error(node: int) -> Message:
    return Message(error=Error(code=0, reason="site crashed"), metadata=_meta(node))


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))})


def _cfg(mode=SITE_SERVER_FIXED, **kw) -> PrivacyConfig:
    section = {"mode": mode, "noise-multiplier": 1.0, "clipping-norm": 1.0, "delta": 1e-5, "min-sites": 2}
    section.update(kw)
    return PrivacyConfig.from_mapping(section)


def _direction(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=D)
    return v / np.linalg.norm(v)


def _configure(strategy, rnd: int, sites: int) -> list[Message]:
    return list(strategy.configure_train(rnd, _global(), ConfigRecord({}), StaticGrid(range(1, sites + 1))))


# --------------------------------------------------------------------------- clipping, weights, noise
def test_server_fixed_clips_weights_equally_and_noises_sigma_c_over_m():
    np.random.seed(1)
    records = []
    s = wrap_strategy(FedAvg(min_available_nodes=3, min_train_nodes=3), _cfg(**{"noise-multiplier": 0.5}),
                      num_sampled_sites=3, recorder=records.append)
    assert len(_configure(s, 1, 3)) == 3
    a, b, c = _direction(1), _direction(2), _direction(3)
    # site 1's update is 10x the clipping norm, site 2's is half of it; site 3 has 1000x the examples.
    replies = [_reply(1, 10 * a, 10), _reply(2, 0.5 * b, 10), _reply(3, 0.25 * c, 10_000)]
    arrays, metrics = s.aggregate_train(1, replies)
    got = arrays["w"].numpy()
    expected = (1.0 * a + 0.5 * b + 0.25 * c) / 3  # clipped to norm 1, then an UNWEIGHTED mean
    noise = got - expected
    assert abs(noise.std() / (0.5 * 1.0 / 3) - 1) < 0.03
    assert abs(noise.mean()) < 0.01
    assert metrics[KEY_EPSILON] == pytest.approx(site_level_epsilon(0.5, 1, 1e-5))
    assert "dp-uniform-weight" not in metrics
    (rp,) = records
    assert rp.released and rp.sites_aggregated == 3 and rp.sites_sampled == 3 and rp.unit == "site"


def test_stock_flower_weights_by_examples_which_dp_noise_does_not_cover():
    """Why we force equal weights: stock FedAvg under the DP wrapper weights by num-examples, so one
    large site's clipped update reaches C, not C/m, while the noise is sized for C/m."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    stock = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1e-12, 1.0, 3)
    stock.current_arrays = _global()
    a, b, c = _direction(1), _direction(2), _direction(3)
    arrays, _ = stock.aggregate_train(1, [_reply(1, 10 * a, 1), _reply(2, b, 1), _reply(3, c, 1_000_000)])
    influence_of_big_site = float(arrays["w"].numpy() @ c)
    assert influence_of_big_site > 0.99  # ~C: the average is essentially site 3's update


def test_failed_site_is_dropped_and_noise_recalibrated_to_the_sites_aggregated():
    np.random.seed(2)
    records = []
    s = wrap_strategy(FedProx(proximal_mu=0.1), _cfg(), num_sampled_sites=3, recorder=records.append)
    _configure(s, 1, 3)
    a, b = _direction(4), _direction(5)
    arrays, metrics = s.aggregate_train(1, [_reply(1, 3 * a), _error(2), _reply(3, 3 * b)])
    assert arrays is not None  # stock Flower would skip the round here
    noise = arrays["w"].numpy() - (a + b) / 2
    assert abs(noise.std() / (1.0 * 1.0 / 2) - 1) < 0.03  # sigma*C/m with m = 2 answering sites
    assert metrics["dp-sites-aggregated"] == 2
    (rp,) = records
    assert rp.released and rp.sites_aggregated == 2 and rp.sites_sampled == 3 and "dropped" in rp.note
    assert rp.epsilon_cumulative == pytest.approx(site_level_epsilon(1.0, 1, 1e-5))


def test_non_finite_update_is_dropped_before_clipping():
    np.random.seed(3)
    s = wrap_strategy(FedAvg(), _cfg(**{"noise-multiplier": 1e-6}), num_sampled_sites=3)
    _configure(s, 1, 3)
    poisoned = _direction(6).copy()
    poisoned[17] = np.nan
    a, b = _direction(7), _direction(8)
    arrays, _ = s.aggregate_train(1, [_reply(1, a), _reply(2, poisoned), _reply(3, b)])
    w = arrays["w"].numpy()
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, (a + b) / 2, atol=1e-4)
    assert s.history[-1].sites_aggregated == 2


def test_too_few_sites_releases_nothing_and_epsilon_does_not_grow():
    records = []
    s = wrap_strategy(FedAvg(), _cfg(**{"min-sites": 2}), num_sampled_sites=3, recorder=records.append)
    _configure(s, 1, 3)
    arrays, _ = s.aggregate_train(1, [_reply(1, _direction(1)), _error(2), _error(3)])
    assert arrays is None
    assert records[-1].released is False and records[-1].epsilon_cumulative == 0.0
    _configure(s, 2, 3)
    arrays, _ = s.aggregate_train(2, [_reply(1, _direction(1)), _reply(2, _direction(2)), _error(3)])
    assert arrays is not None
    assert records[-1].epsilon_cumulative == pytest.approx(site_level_epsilon(1.0, 1, 1e-5))


def test_epsilon_composes_over_rounds_and_budget_stops_training():
    eps_one = site_level_epsilon(2.0, 1, 1e-5)
    eps_two = site_level_epsilon(2.0, 2, 1e-5)
    s = wrap_strategy(FedAvg(), _cfg(**{"noise-multiplier": 2.0, "max-epsilon": eps_two * 1.01}),
                      num_sampled_sites=2)
    for rnd in (1, 2):
        assert len(_configure(s, rnd, 2)) == 2
        s.aggregate_train(rnd, [_reply(1, _direction(rnd)), _reply(2, _direction(rnd + 10))])
    assert s.history[-1].epsilon_cumulative == pytest.approx(eps_two)
    assert s.history[0].epsilon_round == pytest.approx(eps_one) == s.history[1].epsilon_round
    assert eps_two < 2 * eps_one  # RDP composition is tighter than adding epsilons
    # A third round would exceed max-epsilon: no site is asked to train, nothing is released.
    assert _configure(s, 3, 2) == []
    assert s.budget_exhausted and not s.history[-1].released
    assert s.history[-1].epsilon_cumulative == pytest.approx(eps_two)


# --------------------------------------------------------------------------- adaptive clipping
def _adaptive_round(strategy, n: int = 3):
    """All sites send an update of norm 10 (clipped); the target quantile 0 makes the norm shrink."""
    _configure(strategy, 1, n) if hasattr(strategy, "privacy") else None
    if not hasattr(strategy, "privacy"):
        strategy.current_arrays = _global()
    u = 10 * _direction(9)
    c_before = strategy.clipping_norm
    arrays, _ = strategy.aggregate_train(1, [_reply(k, u) for k in range(1, n + 1)])
    expected = c_before * u / np.linalg.norm(u)
    return (arrays["w"].numpy() - expected).std(), c_before, strategy.clipping_norm


def test_adaptive_noise_uses_the_norm_that_clipped_unlike_stock_flower():
    np.random.seed(4)
    kw = dict(noise_multiplier=0.1, num_sampled_clients=3, initial_clipping_norm=1.0,
              target_clipped_quantile=0.0, clip_norm_lr=2.0, clipped_count_stddev=0.1)
    stock = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), **kw)
    sigma_update = stock.noise_multiplier  # Flower's update-noise multiplier after the count's share
    std, c_old, c_new = _adaptive_round(stock)
    assert c_new < 0.2 * c_old  # the norm shrank (all updates were clipped)
    assert std == pytest.approx(sigma_update * c_new / 3, rel=0.03)  # stock: noise for the NEW norm
    assert std < 0.25 * sigma_update * c_old / 3  # ... far too little for updates clipped at the old one

    np.random.seed(4)
    cfg = _cfg(SITE_SERVER_ADAPTIVE, **{"noise-multiplier": 0.1, "target-clipped-quantile": 0.0,
                                         "clip-norm-lr": 2.0, "clipped-count-stddev": 0.1})
    ours = wrap_strategy(FedAvg(), cfg, num_sampled_sites=3)
    std, c_old, c_new = _adaptive_round(ours)
    assert c_new < 0.2 * c_old
    assert std == pytest.approx(sigma_update * c_old / 3, rel=0.03)
    assert ours.history[-1].clipping_norm == c_old and ours.history[-1].noise_multiplier == 0.1


def test_client_adaptive_reads_norm_bits_and_accounts():
    np.random.seed(5)
    cfg = _cfg(SITE_CLIENT_ADAPTIVE, **{"noise-multiplier": 0.5})
    s = wrap_strategy(FedAvg(), cfg, num_sampled_sites=3)
    msgs = _configure(s, 1, 3)
    assert msgs[0].content["config"]["clipping_norm"] == pytest.approx(1.0)
    replies = [_reply(k, 0.5 * _direction(k), extra={"norm_bit": 0}) for k in (1, 2, 3)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics[KEY_EPSILON] == pytest.approx(site_level_epsilon(0.5, 1, 1e-5))
    # count noise defaults to at least sigma for a small consortium (sites/20 would be invalid here)
    assert s.clipped_count_stddev == pytest.approx(0.5)


def test_client_fixed_sends_the_norm_and_matching_mod():
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    s = wrap_strategy(FedAvg(), _cfg(SITE_CLIENT_FIXED, **{"clipping-norm": 0.7}), num_sampled_sites=2)
    msgs = _configure(s, 1, 2)
    assert msgs[0].content["config"]["clipping_norm"] == pytest.approx(0.7)
    assert client_mods(_cfg(SITE_CLIENT_FIXED)) == [fixedclipping_mod]
    assert client_mods(_cfg(SITE_CLIENT_ADAPTIVE)) == [adaptiveclipping_mod]
    assert client_mods(_cfg(SITE_SERVER_FIXED)) == []
    assert client_mods(PrivacyConfig()) == []


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("strategy", [FedAdam(), FedAvgM(), FedMedian(), FedTrimmedAvg()])
def test_non_mean_strategies_are_refused_under_dp(strategy):
    with pytest.raises(PrivacyConfigError, match="averages the site updates"):
        wrap_strategy(strategy, _cfg(), num_sampled_sites=3)


def test_mode_none_returns_the_strategy_untouched():
    base = FedAdam()
    assert wrap_strategy(base, PrivacyConfig(), num_sampled_sites=3) is base


@pytest.mark.parametrize(
    "section, message",
    [
        ({"mode": "site-level"}, "not a privacy mode"),
        ({"mode": "site-server-fixed", "noise-multiplier": -1}, "noise-multiplier must be a positive"),
        ({"mode": "site-server-fixed", "delta": 1.5}, "delta must be strictly between 0 and 1"),
        ({"mode": "site-server-fixed", "clipping-norm": 0}, "clipping-norm must be a positive"),
        ({"mode": "site-server-fixed", "nosie-multiplier": 1.0}, "unknown key privacy.nosie-multiplier"),
        ({"mode": "site-server-adaptive", "noise-multiplier": 1.0, "clipped-count-stddev": 0.2},
         "clipped-count-stddev must exceed"),
        ({"patient-dp": True}, "refused for the 'wscl' objective"),
        ({"patient-dp": True, "patient-epsilon": 1.0, "patient-noise-multiplier": 1.0}, "refused"),
    ],
)
def test_bad_privacy_sections_get_one_clear_message(section, message):
    with pytest.raises(PrivacyConfigError, match=message):
        PrivacyConfig.from_mapping(section)


def test_run_config_parsing_flattened_and_guarded():
    rc = {"privacy.mode": "site-client-fixed", "privacy.noise-multiplier": 0.8, "min-sites": 3,
          "task": "pretrain"}
    cfg = PrivacyConfig.from_run_config(rc)
    assert cfg.mode == SITE_CLIENT_FIXED and cfg.noise_multiplier == 0.8 and cfg.min_sites == 3
    with pytest.raises(PrivacyConfigError, match="objective: its loss couples the samples"):
        PrivacyConfig.from_run_config({"privacy.patient-dp": True, "privacy.patient-epsilon": 3.0,
                                       "task": "pretrain", "objective": "clip"})
    head = PrivacyConfig.from_run_config({"privacy.patient-dp": True, "privacy.patient-epsilon": 3.0,
                                          "task": "head"})
    assert head.patient_dp and head.patient_epsilon == 3.0
    assert math.isinf(PrivacyConfig().planned_epsilon(3))
    assert cfg.planned_epsilon(4) == pytest.approx(site_level_epsilon(0.8, 4, 1e-5))


# --------------------------------------------------------------------------- the coordinator database
def test_round_privacy_is_recorded_in_the_coordinator_database_and_resumes(tmp_path):
    engine = make_engine(tmp_path / "coordinator.db")
    s = wrap_strategy(FedAvg(), _cfg(**{"noise-multiplier": 1.5}), num_sampled_sites=2,
                      recorder=lambda rp: record_round_privacy(engine, rp, run_id="run-1"))
    for rnd in (1, 2):
        _configure(s, rnd, 2)
        s.aggregate_train(rnd, [_reply(1, _direction(rnd)), _reply(2, _direction(rnd + 5))])
    _configure(s, 3, 2)
    s.aggregate_train(3, [_reply(1, _direction(3)), _error(2)])  # below min-sites: recorded as skipped
    rows = load_round_privacy(engine, "run-1")
    assert [(r.server_round, r.released) for r in rows] == [(1, True), (2, True), (3, False)]
    assert rows[1].epsilon_cumulative == pytest.approx(site_level_epsilon(1.5, 2, 1e-5))
    assert rows[2].epsilon_cumulative == rows[1].epsilon_cumulative
    assert all(r.delta == 1e-5 and "server-side fixed" in r.mechanism for r in rows)
    lines = privacy_summary(engine, "run-1").lines()
    assert "epsilon = " in lines[0] and "2 released round(s)" in lines[0] and "1 round(s) skipped" in lines[0]
    assert len(lines) == 4

    # Resume: a new coordinator process rebuilds the budget from the database and continues it.
    state = accountant_state_from_records(rows, 1e-5)
    resumed = wrap_strategy(FedAvg(), _cfg(**{"noise-multiplier": 1.5}), num_sampled_sites=2,
                            accountant_state=state)
    _configure(resumed, 4, 2)
    resumed.aggregate_train(4, [_reply(1, _direction(4)), _reply(2, _direction(9))])
    assert resumed.history[-1].epsilon_cumulative == pytest.approx(site_level_epsilon(1.5, 3, 1e-5))
    assert resumed.privacy_state()["accountant"]["delta"] == 1e-5
    # the schema is additive and idempotent: a second ensure does nothing
    assert len(load_round_privacy(engine)) == 3


@pytest.mark.parametrize("clipped, shrinks", [(True, True), (False, False)])
def test_client_adaptive_recovers_the_norm_bit_when_the_round_loop_drops_it(clipped, shrinks):
    """A round loop that rebuilds replies keeps only num-examples; the bit is derived from the norm."""
    np.random.seed(6)
    s = wrap_strategy(FedAvg(), _cfg(SITE_CLIENT_ADAPTIVE, **{"noise-multiplier": 0.01}), num_sampled_sites=3)
    _configure(s, 1, 3)
    c_old = s.clipping_norm
    size = c_old if clipped else 0.3 * c_old  # what fixed/adaptive clipping mods leave on the wire
    arrays, _ = s.aggregate_train(1, [_reply(k, size * _direction(k)) for k in (1, 2, 3)])
    assert arrays is not None
    assert (s.clipping_norm < c_old) == shrinks


def test_site_dp_mod_clips_on_the_site_in_client_side_mode_only():
    """The ClientApp mod reads the run's mode at call time (real Flower Context and Messages)."""
    from flwr.app import Context

    from server.privacy import site_dp_mod

    def instruction(clip: float | None) -> Message:
        config = ConfigRecord({"clipping_norm": clip} if clip is not None else {})
        meta = _meta(0)
        meta.message_type = MessageType.TRAIN
        return Message(RecordDict({"arrays": _global(), "config": config}), metadata=meta)

    def train(msg: Message, ctx: Context) -> Message:  # the site's training: an update of norm 10
        return _reply(1, 10 * _direction(3))

    def run(run_config: dict, clip: float | None) -> Message:
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
        return site_dp_mod(instruction(clip), ctx, train)

    # patient-level settings of a head run do not disturb the site-level clipping
    out = run({"privacy.mode": "site-client-fixed", "privacy.patient-dp": True, "task": "head"}, 0.5)
    assert np.linalg.norm(out.content["arrays"]["w"].numpy()) == pytest.approx(0.5, rel=1e-4)
    out = run({"privacy.mode": "site-server-fixed"}, None)  # the server clips: the site sends as is
    assert np.linalg.norm(out.content["arrays"]["w"].numpy()) == pytest.approx(10, rel=1e-4)
    out = run({}, None)
    assert np.linalg.norm(out.content["arrays"]["w"].numpy()) == pytest.approx(10, rel=1e-4)
