"""Site-level differential privacy for federated runs: Flower 1.42's DP wrappers, made to hold.

The unit protected is a whole hospital: each site's update (new weights - global weights) is clipped to
L2 norm C, the coordinator averages the clipped updates with EQUAL weights and adds Gaussian noise of
standard deviation sigma*C/m to the average of the m aggregated sites (sigma*C on their sum). Each round
is one Gaussian release; `vilref_fed.privacy.SiteLevelAccountant` composes them (RDP, add/remove one site,
no sampling amplification) into the cumulative epsilon at the run's delta.

What we add to Flower's wrappers, and why:
- Failure policy. Flower's DP wrappers skip the whole round when any site fails. We PROCEED WITH THE
  SITES THAT ANSWERED when at least `min_sites` did: failed, timed-out and non-finite replies are dropped
  before clipping, the noise is re-calibrated to the number actually averaged (sigma*C/m), and the round
  is accounted as one Gaussian release with multiplier sigma. With fewer than `min_sites`, nothing is
  released (the global model does not move) and epsilon does not grow. Retrying inside the round is
  not offered: `Strategy.start` has no hook for it, and a retried round would be a second release.
- Equal weights. Flower's FedAvg weights sites by `num-examples`; the noise is calibrated to C/m, which is
  the sensitivity of an *unweighted* mean only. We aggregate with equal weights under DP.
- Adaptive clipping. Flower 1.42's adaptive wrappers update the clipping norm *before* adding the noise,
  so the noise is scaled to the new norm while the updates were clipped with the old one; when the norm
  shrinks, the noise is too small for the stated guarantee. We add the noise for the norm that clipped.
- Accounting. Flower's `RdpAccountant` needs `dp-accounting` (not in our pinned stack) and exists only for
  fixed clipping; ours covers all four modes (adaptive: the effective multiplier z of Andrew et al.).
- Only mean aggregation. Noise calibrated to C/m is valid for a plain mean of all given replies
  (FedAvg, FedProx). Server optimisers (FedAdam, FedAvgM) noise *after* a data-dependent step and robust
  aggregators (median, trimmed mean, Krum) have other sensitivities: refused under DP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from vilref_fed.privacy.accounting import RoundPrivacy, SiteLevelAccountant, site_level_epsilon
from vilref_fed.train.privacy import PrivacyGuardError, require_per_sample_decomposable

NONE = "none"
SITE_SERVER_FIXED = "site-server-fixed"
SITE_CLIENT_FIXED = "site-client-fixed"
SITE_SERVER_ADAPTIVE = "site-server-adaptive"
SITE_CLIENT_ADAPTIVE = "site-client-adaptive"
PRIVACY_MODES = (NONE, SITE_SERVER_FIXED, SITE_CLIENT_FIXED, SITE_SERVER_ADAPTIVE, SITE_CLIENT_ADAPTIVE)
TASKS = ("pretrain", "head")

#: Metric keys the DP strategy adds to each round's aggregated train metrics.
KEY_EPSILON = "dp-epsilon"
KEY_EPSILON_ROUND = "dp-epsilon-round"
KEY_DELTA = "dp-delta"
KEY_SITES_AGGREGATED = "dp-sites-aggregated"
_UNIFORM_WEIGHT_KEY = "dp-uniform-weight"
KEY_NORM_BIT = "norm_bit"  # flwr.supercore.differential_privacy.KEY_NORM_BIT


class PrivacyConfigError(ValueError):
    """The run configuration's privacy section is invalid (the message says which key and why)."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class PrivacyConfig:
    """The run configuration's `[privacy]` section.

    Site-level keys: mode, noise-multiplier, clipping-norm (fixed norm, or initial norm when adaptive),
    delta, min-sites, max-epsilon, target-clipped-quantile, clip-norm-lr, clipped-count-stddev.
    Patient-level keys (Opacus DP-SGD at each site, task = "head" only): patient-dp, patient-epsilon,
    patient-delta, patient-noise-multiplier, max-grad-norm.
    """

    mode: str = NONE
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    min_sites: int = 2
    max_epsilon: float | None = None
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    patient_dp: bool = False
    patient_epsilon: float | None = None
    patient_delta: float | None = None
    patient_noise_multiplier: float | None = None
    max_grad_norm: float = 0.1
    task: str = "pretrain"
    objective: str = "wscl"

    # ---- parsing
    @classmethod
    def from_mapping(
        cls, section: Mapping[str, Any] | None, *, task: str = "pretrain", objective: str = "wscl"
    ) -> PrivacyConfig:
        """Parse a `[privacy]` table (keys with '-' or '_'); unknown keys are an error, not ignored."""
        section = dict(section or {})
        names = {f: f for f in cls.__dataclass_fields__ if f not in ("task", "objective")}
        kwargs: dict[str, Any] = {}
        for raw_key, value in section.items():
            key = str(raw_key).replace("-", "_")
            if key not in names:
                allowed = ", ".join(sorted(k.replace("_", "-") for k in names))
                raise PrivacyConfigError(f"unknown key privacy.{raw_key}; allowed keys: {allowed}")
            kwargs[key] = value
        cfg = cls(**kwargs, task=str(task), objective=str(objective))
        cfg.validate()
        return cfg

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> PrivacyConfig:
        """Read the privacy section from a Flower run config (flattened `privacy.<key>` entries) or a
        nested mapping (`{"privacy": {...}}`), with the run's `task` and `objective`."""
        section: dict[str, Any] = {}
        nested = run_config.get("privacy")
        if isinstance(nested, Mapping):
            section.update(nested)
        for k, v in run_config.items():
            if isinstance(k, str) and k.startswith("privacy.") and k.count(".") == 1:
                section[k.split(".", 1)[1]] = v
        if "min-sites" in run_config and not any(k.replace("-", "_") == "min_sites" for k in section):
            section["min-sites"] = int(run_config["min-sites"])
        task = str(run_config.get("task", "pretrain"))
        objective = str(run_config.get("objective", run_config.get("train.objective", "wscl")))
        return cls.from_mapping(section, task=task, objective=objective)

    # ---- validation
    def validate(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise PrivacyConfigError(
                f"privacy.mode = {self.mode!r} is not a privacy mode; use one of: {', '.join(PRIVACY_MODES)}"
            )
        if self.task not in TASKS:
            raise PrivacyConfigError(f"task = {self.task!r} is not a task; use one of: {', '.join(TASKS)}")

        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = "a non-negative" if allow_zero else "a positive"
                raise PrivacyConfigError(f"privacy.{name} must be {bound} number, got {value!r}")

        if self.mode != NONE:
            positive("noise-multiplier", self.noise_multiplier)
            positive("clipping-norm", self.clipping_norm)
            if not (isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0):
                raise PrivacyConfigError(
                    f"privacy.delta must be strictly between 0 and 1, got {self.delta!r}"
                )
            if not (isinstance(self.min_sites, int) and self.min_sites >= 1):
                raise PrivacyConfigError(f"privacy.min-sites must be an integer >= 1, got {self.min_sites!r}")
            if self.max_epsilon is not None:
                positive("max-epsilon", self.max_epsilon)
            if self.adaptive:
                if not 0.0 <= self.target_clipped_quantile <= 1.0:
                    raise PrivacyConfigError("privacy.target-clipped-quantile must be in [0, 1]")
                positive("clip-norm-lr", self.clip_norm_lr)
                if self.clipped_count_stddev is not None:
                    positive("clipped-count-stddev", self.clipped_count_stddev)
                    if self.noise_multiplier >= 2 * self.clipped_count_stddev:
                        raise PrivacyConfigError(
                            "privacy.clipped-count-stddev must exceed noise-multiplier / 2 (Andrew et al.: "
                            "the count noise takes part of the budget); raise it or leave it unset"
                        )
        if self.patient_dp:
            if self.task != "head":
                try:
                    require_per_sample_decomposable(self.objective)
                except PrivacyGuardError as exc:
                    raise PrivacyConfigError(str(exc)) from None
            if (self.patient_epsilon is None) == (self.patient_noise_multiplier is None):
                raise PrivacyConfigError(
                    "privacy.patient-dp needs exactly one of privacy.patient-epsilon or "
                    "privacy.patient-noise-multiplier"
                )
            if self.patient_epsilon is not None:
                positive("patient-epsilon", self.patient_epsilon)
            if self.patient_noise_multiplier is not None:
                positive("patient-noise-multiplier", self.patient_noise_multiplier)
            if self.patient_delta is not None and not 0.0 < self.patient_delta < 1.0:
                raise PrivacyConfigError("privacy.patient-delta must be strictly between 0 and 1")
            positive("max-grad-norm", self.max_grad_norm)

    # ---- derived
    @property
    def site_level(self) -> bool:
        return self.mode != NONE

    @property
    def adaptive(self) -> bool:
        return self.mode in (SITE_SERVER_ADAPTIVE, SITE_CLIENT_ADAPTIVE)

    @property
    def client_side(self) -> bool:
        return self.mode in (SITE_CLIENT_FIXED, SITE_CLIENT_ADAPTIVE)

    def effective_count_stddev(self, num_sampled_sites: int) -> float:
        """Noise on the clipped-count of adaptive clipping. Andrew et al. suggest sites/20, which is far too
        small for a consortium of a few hospitals (it must exceed sigma/2), so we never go below sigma."""
        if self.clipped_count_stddev is not None:
            return float(self.clipped_count_stddev)
        return float(max(num_sampled_sites / 20.0, self.noise_multiplier))

    def mechanism(self) -> str:
        return {
            NONE: "none",
            SITE_SERVER_FIXED: "gaussian, site-level, server-side fixed clipping",
            SITE_CLIENT_FIXED: "gaussian, site-level, client-side fixed clipping",
            SITE_SERVER_ADAPTIVE: "gaussian, site-level, server-side adaptive clipping",
            SITE_CLIENT_ADAPTIVE: "gaussian, site-level, client-side adaptive clipping",
        }[self.mode]

    def planned_epsilon(self, rounds: int) -> float:
        """Epsilon the run will have spent after `rounds` released rounds (for the start-up banner)."""
        if not self.site_level:
            return math.inf
        return site_level_epsilon(self.noise_multiplier, rounds, self.delta)

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v is not None}


# --------------------------------------------------------------------------- the strategy wrappers
def _require_mean_aggregation(strategy: Any) -> None:
    from flwr.serverapp.strategy import FedAvg

    agg = getattr(type(strategy), "aggregate_train", None)
    if isinstance(strategy, FedAvg) and (
        agg is FedAvg.aggregate_train or getattr(strategy, "dp_mean_aggregation", False)
    ):
        return
    raise PrivacyConfigError(
        f"site-level DP needs a strategy that averages the site updates it is given (FedAvg or FedProx); "
        f"{type(strategy).__name__} aggregates differently (a server optimiser, momentum or a robust "
        "statistic), and the noise calibrated to clip/m would not cover it. Use strategy = 'fedavg' or "
        "'fedprox' with privacy, or set `dp_mean_aggregation = True` on a FedAvg subclass whose "
        "aggregate_train is the plain mean of all replies it receives."
    )


def _update_norm(msg: Any, global_arrays: Any) -> float:
    import numpy as np

    record = next(iter(msg.content.array_records.values()))
    new, old = record.to_numpy_ndarrays(), global_arrays.to_numpy_ndarrays()
    total = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(new, old, strict=True))
    return float(np.sqrt(total))


def _finite_reply(msg: Any) -> bool:
    import numpy as np

    for record in msg.content.array_records.values():
        for arr in record.to_numpy_ndarrays():
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                return False
    return True


class _SiteDPMixin:
    """Failure policy, equal weights, correct adaptive noise and accounting around a Flower DP wrapper."""

    privacy: PrivacyConfig
    site_accountant: SiteLevelAccountant
    population: int
    history: list[RoundPrivacy]
    budget_exhausted: bool

    def _setup_site_dp(
        self,
        privacy: PrivacyConfig,
        population: int,
        recorder: Callable[[RoundPrivacy], None] | None,
        accountant_state: Mapping[str, Any] | None,
    ) -> None:
        self.privacy = privacy
        self.population = int(population)
        self.site_accountant = SiteLevelAccountant(privacy.delta, privacy.max_epsilon)
        if accountant_state:
            self.site_accountant.load_state_dict(dict(accountant_state))
        self._recorder = recorder
        self.history = []
        self.budget_exhausted = False
        self._sampled: dict[int, int] = {}
        self._clip_at_configure: dict[int, float] = {}
        self._global_at_configure: dict[int, Any] = {}
        self._noise_clip_norm: float | None = None

    # -- Flower's wrappers call this with the wrapper's own noise multiplier and self.clipping_norm.
    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: Any) -> Any:
        import numpy as np
        from flwr.app import Array, ArrayRecord
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

        clip = self._noise_clip_norm if self._noise_clip_norm is not None else self.clipping_norm
        nds = aggregated_arrays.to_numpy_ndarrays()
        stdv = float(self.noise_multiplier) * float(clip) / float(self.num_sampled_clients)
        self._last_noise_stdv = stdv
        add_gaussian_noise_inplace(nds, stdv)
        keys = aggregated_arrays.keys()
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, nds, strict=True)})

    def _accounted_multiplier(self) -> float:
        # Adaptive: the update noise and the clipped-count noise together equal one Gaussian release with
        # multiplier z (Andrew et al. 2021, Thm 1); fixed: the noise multiplier itself.
        return float(self.privacy.noise_multiplier)

    def _record(self, rp: RoundPrivacy) -> None:
        self.history.append(rp)
        if self._recorder is not None:
            self._recorder(rp)

    def _round_record(self, server_round: int, sampled: int, aggregated: int, released: bool, note: str,
                      clip: float, eps_round: float) -> RoundPrivacy:
        return RoundPrivacy(
            server_round=int(server_round),
            mechanism=self.privacy.mechanism(),
            unit="site",
            noise_multiplier=self._accounted_multiplier(),
            clipping_norm=float(clip),
            sites_sampled=int(sampled),
            sites_aggregated=int(aggregated),
            population=self.population,
            sample_rate=1.0,
            delta=self.privacy.delta,
            epsilon_round=float(eps_round),
            epsilon_cumulative=self.site_accountant.epsilon(),
            released=released,
            note=note,
        )

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        if self.site_accountant.would_exceed(self._accounted_multiplier()):
            self.budget_exhausted = True
            self._record(self._round_record(
                server_round, 0, 0, False,
                f"not run: one more round would exceed max-epsilon={self.privacy.max_epsilon}",
                self.clipping_norm, 0.0,
            ))
            return []
        self._clip_at_configure[server_round] = float(self.clipping_norm)
        if self.privacy.mode == SITE_CLIENT_ADAPTIVE:
            self._global_at_configure[server_round] = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sampled[server_round] = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        replies = list(replies)
        sampled = self._sampled.pop(server_round, len(replies))
        clip = self._clip_at_configure.pop(server_round, float(self.clipping_norm))
        global_arrays = self._global_at_configure.pop(server_round, None)
        if sampled == 0 and not replies:
            return None, None
        ok = [r for r in replies if not r.has_error() and _finite_reply(r)]
        failed = sampled - len(ok)
        if len(ok) < self.privacy.min_sites:
            self._record(self._round_record(
                server_round, sampled, len(ok), False,
                f"skipped: {len(ok)} of {sampled} sites answered, min-sites={self.privacy.min_sites}; "
                "nothing released, epsilon unchanged",
                clip, 0.0,
            ))
            return None, None
        for r in ok:
            mrec = next(iter(r.content.metric_records.values()))
            mrec[_UNIFORM_WEIGHT_KEY] = 1
            needs_bit = self.privacy.mode == SITE_CLIENT_ADAPTIVE and KEY_NORM_BIT not in mrec
            if needs_bit and global_arrays is not None:
                # A round loop that rebuilds replies may drop the mod's bit; it is recoverable: an update
                # the site clipped has norm C (to float precision), an unclipped one less.
                mrec[KEY_NORM_BIT] = int(_update_norm(r, global_arrays) >= clip * (1 - 1e-5))
        inner = self.strategy  # type: ignore[attr-defined]
        saved_key, saved_n = inner.weighted_by_key, self.num_sampled_clients
        inner.weighted_by_key = _UNIFORM_WEIGHT_KEY
        self.num_sampled_clients = len(ok)
        self._noise_clip_norm = clip
        try:
            arrays, metrics = super().aggregate_train(server_round, ok)  # type: ignore[misc]
        finally:
            inner.weighted_by_key = saved_key
            self.num_sampled_clients = saved_n
            self._noise_clip_norm = None
        if arrays is None:
            self._record(self._round_record(server_round, sampled, len(ok), False,
                                            "aggregation returned nothing; nothing released", clip, 0.0))
            return None, metrics
        eps_round, eps_total = self.site_accountant.record_release(
            server_round, self._accounted_multiplier(), 1.0
        )
        note = f"{failed} of {sampled} sampled sites dropped (failed or non-finite)" if failed else ""
        rp = self._round_record(server_round, sampled, len(ok), True, note, clip, eps_round)
        self._record(rp)
        if metrics is not None:
            if _UNIFORM_WEIGHT_KEY in metrics:
                del metrics[_UNIFORM_WEIGHT_KEY]
            metrics[KEY_EPSILON] = float(eps_total)
            metrics[KEY_EPSILON_ROUND] = float(eps_round)
            metrics[KEY_DELTA] = float(self.privacy.delta)
            metrics[KEY_SITES_AGGREGATED] = int(len(ok))
        return arrays, metrics

    def privacy_state(self) -> dict[str, Any]:
        """What the coordinator persists with a round checkpoint to resume the same budget."""
        state: dict[str, Any] = {"accountant": self.site_accountant.state_dict()}
        if self.privacy.adaptive:
            state["clipping_norm"] = float(self.clipping_norm)
        return state

    def load_privacy_state(self, state: Mapping[str, Any]) -> None:
        self.site_accountant.load_state_dict(dict(state["accountant"]))
        if self.privacy.adaptive and "clipping_norm" in state:
            self.clipping_norm = float(state["clipping_norm"])


def _wrapper_classes() -> dict[str, type]:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    def make(name: str, base: type) -> type:
        return type(name, (_SiteDPMixin, base), {"__module__": __name__})

    return {
        SITE_SERVER_FIXED: make("SiteDPServerSideFixedClipping", DifferentialPrivacyServerSideFixedClipping),
        SITE_CLIENT_FIXED: make("SiteDPClientSideFixedClipping", DifferentialPrivacyClientSideFixedClipping),
        SITE_SERVER_ADAPTIVE: make(
            "SiteDPServerSideAdaptiveClipping", DifferentialPrivacyServerSideAdaptiveClipping
        ),
        SITE_CLIENT_ADAPTIVE: make(
            "SiteDPClientSideAdaptiveClipping", DifferentialPrivacyClientSideAdaptiveClipping
        ),
    }


def wrap_strategy(
    strategy: Any,
    privacy: PrivacyConfig,
    *,
    num_sampled_sites: int,
    population: int | None = None,
    recorder: Callable[[RoundPrivacy], None] | None = None,
    accountant_state: Mapping[str, Any] | None = None,
) -> Any:
    """Wrap a FedAvg/FedProx strategy with site-level DP as the privacy config says (mode "none": as is).

    `num_sampled_sites`: how many sites the strategy samples per round (for the initial noise scale and
    the adaptive count noise); `population`: registered sites (recorded). `recorder` receives one
    `RoundPrivacy` per round (the coordinator writes it to its database, see `record_round_privacy`).
    `accountant_state` resumes the budget of an interrupted run (`strategy.privacy_state()`).
    """
    if not privacy.site_level:
        return strategy
    _require_mean_aggregation(strategy)
    if num_sampled_sites < 1:
        raise PrivacyConfigError("site-level DP needs at least one sampled site per round")
    classes = _wrapper_classes()
    cls = classes[privacy.mode]
    if privacy.adaptive:
        wrapped = cls(
            strategy,
            noise_multiplier=privacy.noise_multiplier,
            num_sampled_clients=num_sampled_sites,
            initial_clipping_norm=privacy.clipping_norm,
            target_clipped_quantile=privacy.target_clipped_quantile,
            clip_norm_lr=privacy.clip_norm_lr,
            clipped_count_stddev=privacy.effective_count_stddev(num_sampled_sites),
        )
    else:
        wrapped = cls(
            strategy,
            noise_multiplier=privacy.noise_multiplier,
            clipping_norm=privacy.clipping_norm,
            num_sampled_clients=num_sampled_sites,
        )
    wrapped._setup_site_dp(privacy, population or num_sampled_sites, recorder, accountant_state)
    return wrapped


# --------------------------------------------------------------------------- the ClientApp side
def client_mods(privacy: PrivacyConfig) -> list[Callable[..., Any]]:
    """The ClientApp train mods that match a privacy mode (attach to `@app.train(mods=...)` only:
    the clipping mods reject messages without a clipping norm, which evaluate messages never carry)."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    if privacy.mode == SITE_CLIENT_FIXED:
        return [fixedclipping_mod]
    if privacy.mode == SITE_CLIENT_ADAPTIVE:
        return [adaptiveclipping_mod]
    return []


def site_dp_mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """One train mod for every run: clips on the site when the run's privacy mode says so.

    Mods are fixed when client/app.py is imported, but the privacy mode is a per-run setting; this mod
    reads it from `context.run_config` at call time and delegates to Flower's clipping mod. Use it as
    the LAST train mod: `@app.train(mods=[site_dp_mod])`.
    """
    # Only the site-level mode matters on the site; the patient-level settings were validated by the
    # coordinator (and the run config a ClientApp sees need not carry the task they depend on).
    rc = context.run_config
    nested = rc.get("privacy")
    mode = rc.get("privacy.mode", nested.get("mode", NONE) if isinstance(nested, Mapping) else NONE)
    privacy = PrivacyConfig(mode=str(mode))
    privacy.validate()
    mods = client_mods(privacy)
    if not mods:
        return call_next(msg, context)
    return mods[0](msg, context, call_next)


# --------------------------------------------------------------------------- the coordinator database
def _round_privacy_table() -> Any:
    from sqlalchemy import Boolean, Column, DateTime, Float, Integer, MetaData, String, Table, Text, func

    md = MetaData()
    return Table(
        "round_privacy",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(128), nullable=False, default="", index=True),
        Column("server_round", Integer, nullable=False),
        Column("mechanism", String(128), nullable=False),
        Column("unit", String(32), nullable=False),
        Column("noise_multiplier", Float, nullable=False),
        Column("clipping_norm", Float, nullable=False),
        Column("sites_sampled", Integer, nullable=False),
        Column("sites_aggregated", Integer, nullable=False),
        Column("population", Integer, nullable=False),
        Column("sample_rate", Float, nullable=False),
        Column("delta", Float, nullable=False),
        Column("epsilon_round", Float, nullable=False),
        Column("epsilon_cumulative", Float, nullable=False),
        Column("released", Boolean, nullable=False),
        Column("accounting", String(32), nullable=False),
        Column("note", Text, nullable=False, default=""),
        Column("recorded_at", DateTime, server_default=func.current_timestamp()),
    )


_TABLE: Any = None


def _table() -> Any:
    global _TABLE
    if _TABLE is None:
        _TABLE = _round_privacy_table()
    return _TABLE


def _migration_1(conn: Any) -> None:
    _table().create(conn, checkfirst=True)


PRIVACY_SCHEMA = "privacy"
PRIVACY_MIGRATIONS = [_migration_1]


def ensure_privacy_schema(engine: Any) -> None:
    """Create (or upgrade) the coordinator database's `round_privacy` table; additive, idempotent."""
    from vilref_fed.store.db import migrate

    migrate(engine, PRIVACY_SCHEMA, PRIVACY_MIGRATIONS)


_COLUMNS = list(RoundPrivacy.__dataclass_fields__)


def record_round_privacy(engine: Any, rp: RoundPrivacy, run_id: str = "") -> None:
    """Append one round's privacy record (epsilon, delta, mechanism, sites) to the coordinator database."""
    ensure_privacy_schema(engine)
    values = rp.to_dict()
    values["run_id"] = str(run_id)
    with engine.begin() as conn:
        conn.execute(_table().insert(), values)


def load_round_privacy(engine: Any, run_id: str | None = None) -> list[RoundPrivacy]:
    """Every recorded round's privacy, oldest first (optionally of one run)."""
    from sqlalchemy import select

    ensure_privacy_schema(engine)
    t = _table()
    query = select(*[t.c[c] for c in _COLUMNS]).order_by(t.c.id)
    if run_id is not None:
        query = query.where(t.c.run_id == str(run_id))
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [RoundPrivacy(**{**dict(row), "released": bool(row["released"])}) for row in rows]


def accountant_state_from_records(records: Iterable[RoundPrivacy], delta: float) -> dict[str, Any]:
    """Rebuild the accountant's state from the database (resume after the coordinator was killed)."""
    acc = SiteLevelAccountant(delta)
    for rp in records:
        if rp.released:
            acc.record_release(rp.server_round, rp.noise_multiplier, rp.sample_rate)
    return acc.state_dict()


@dataclass
class PrivacySummary:
    """What `vilref-server status` shows about privacy."""

    mechanism: str
    delta: float | None
    epsilon: float | None
    released_rounds: int
    skipped_rounds: int
    rows: list[RoundPrivacy] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.rows:
            return [f"privacy: {self.mechanism}"]
        head = (
            f"privacy: {self.mechanism}; epsilon = {self.epsilon:.3f} at delta = {self.delta:g} after "
            f"{self.released_rounds} released round(s)"
        )
        if self.skipped_rounds:
            head += f", {self.skipped_rounds} round(s) skipped (nothing released)"
        out = [head]
        for rp in self.rows:
            state = "released" if rp.released else "skipped"
            out.append(
                f"  round {rp.server_round}: {state}, sites {rp.sites_aggregated}/{rp.sites_sampled}, "
                f"sigma={rp.noise_multiplier:g}, clip={rp.clipping_norm:.4g}, "
                f"epsilon_round={rp.epsilon_round:.3f}, epsilon_total={rp.epsilon_cumulative:.3f}"
                + (f" ({rp.note})" if rp.note else "")
            )
        return out


def privacy_summary(engine: Any, run_id: str | None = None) -> PrivacySummary:
    rows = load_round_privacy(engine, run_id)
    if not rows:
        return PrivacySummary("none recorded", None, None, 0, 0, [])
    last = rows[-1]
    return PrivacySummary(
        mechanism=last.mechanism,
        delta=last.delta,
        epsilon=last.epsilon_cumulative,
        released_rounds=sum(r.released for r in rows),
        skipped_rounds=sum(not r.released for r in rows),
        rows=rows,
    )
