"""The run configuration (`run.toml`): what a consortium trains, how, and how patiently it waits.

One TOML file in the consortium directory, written with comments by `vilref-server init` and read by
both `vilref-server start` and the ServerApp. Everything the sites must agree on (model config,
ontology hash, training hyper-parameters) lives here, so a run is reproducible from this file plus
the checkpoints.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")


class RunConfigError(ValueError):
    """run.toml is missing, malformed or holds an invalid value; the message names the key."""


@dataclass
class RunSection:
    rounds: int = 3
    local_epochs: int = 1
    local_steps: int = 0
    model: str = "tiny"
    model_config_hash: str = ""
    ontology_hash: str = ""
    seed: int = 0
    eval_every: int = 1
    prompt_language: str = "en"
    task: str = "pretrain"


@dataclass
class SitesSection:
    min_sites: int = 2
    wait_for_sites_s: float = 600.0
    round_timeout_s: float = 3600.0
    straggler_grace_s: float = 120.0
    poll_interval_s: float = 0.5


@dataclass
class StrategySection:
    name: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2


@dataclass
class SafetySection:
    max_update_norm: float = 1.0e4
    max_norm_ratio: float = 20.0


@dataclass
class ServerSection:
    host: str = "0.0.0.0"
    port: int = 9092
    public_address: str = ""
    database_url: str = ""


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    sites: SitesSection = field(default_factory=SitesSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    safety: SafetySection = field(default_factory=SafetySection)
    privacy: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    server: ServerSection = field(default_factory=ServerSection)
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RunConfig:
        r, s = self.run, self.sites
        _check(r.rounds >= 1, "run.rounds must be >= 1")
        _check(
            r.local_epochs >= 0 and r.local_steps >= 0, "run.local_epochs and run.local_steps must be >= 0"
        )
        _check(r.local_epochs > 0 or r.local_steps > 0, "set run.local_epochs or run.local_steps above 0")
        _check(r.eval_every >= 0, "run.eval_every must be >= 0 (0 = never)")
        _check(r.prompt_language in ("en", "zh"), "run.prompt_language must be 'en' or 'zh'")
        _check(s.min_sites >= 1, "sites.min_sites must be >= 1")
        for k in ("wait_for_sites_s", "round_timeout_s", "straggler_grace_s", "poll_interval_s"):
            _check(getattr(s, k) > 0, f"sites.{k} must be > 0")
        _check(self.strategy.name in STRATEGIES, f"strategy.name must be one of {', '.join(STRATEGIES)}")
        _check(0.0 <= self.strategy.trim_beta < 0.5, "strategy.trim_beta must be in [0, 0.5)")
        _check(self.safety.max_update_norm > 0, "safety.max_update_norm must be > 0")
        _check(self.safety.max_norm_ratio > 1, "safety.max_norm_ratio must be > 1")
        _check(r.task in ("pretrain", "head"), "run.task must be 'pretrain' or 'head' (docs/privacy.md)")
        if r.task == "head":
            from server.head_task import HeadTaskError, check_head_train_section

            try:
                check_head_train_section(self.train)
            except HeadTaskError as err:
                raise RunConfigError(str(err)) from None
        self.privacy_config()  # raises PrivacyConfigError (a ValueError) naming the bad key
        _check(1 <= self.server.port <= 65535, "server.port must be a TCP port")
        for k, v in self.train.items():
            _check(isinstance(v, (int, float, str, bool)), f"train.{k} must be a number, string or boolean")
        return self

    def privacy_config(self) -> Any:
        """The [privacy] table parsed by server/privacy.py (site-level DP; see docs/privacy.md)."""
        from server.privacy import PrivacyConfig, PrivacyConfigError

        try:
            section = dict(self.privacy)
            if not any(str(k).replace("-", "_") == "min_sites" for k in section):
                section["min-sites"] = self.sites.min_sites
            return PrivacyConfig.from_mapping(
                section, task=self.run.task, objective=str(self.train.get("objective", "wscl"))
            )
        except PrivacyConfigError as err:
            raise RunConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise RunConfigError(msg)


_SECTIONS = {
    "run": RunSection,
    "sites": SitesSection,
    "strategy": StrategySection,
    "safety": SafetySection,
    "server": ServerSection,
}


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig, rejecting unknown sections/keys (a typo must not silently fall back)."""
    cfg = RunConfig()
    for sec, value in data.items():
        if sec in ("train", "privacy"):
            if not isinstance(value, dict):
                raise RunConfigError(f"[{sec}] must be a table")
            setattr(cfg, sec, dict(value))
            continue
        if sec not in _SECTIONS:
            known_sections = ", ".join([*_SECTIONS, "privacy", "train"])
            raise RunConfigError(f"unknown section [{sec}] in run.toml (known: {known_sections})")
        if not isinstance(value, dict):
            raise RunConfigError(f"[{sec}] must be a table")
        obj = getattr(cfg, sec)
        known = {f.name: f for f in fields(obj)}
        for k, v in value.items():
            if k not in known:
                raise RunConfigError(f"unknown key {sec}.{k} in run.toml (known: {', '.join(known)})")
            default = getattr(obj, k)
            if isinstance(default, bool) or isinstance(default, str):
                ok = isinstance(v, type(default))
            elif isinstance(default, float):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                v = float(v) if ok else v
            else:
                ok = isinstance(v, int) and not isinstance(v, bool)
            if not ok:
                raise RunConfigError(f"{sec}.{k} must be a {type(default).__name__}, got {v!r}")
            setattr(obj, k, v)
    return cfg.validate()


def load_run_config(path: Path) -> RunConfig:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunConfigError(
            f"{path} not found; create the consortium with `vilref-server init --dir DIR`"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise RunConfigError(f"{path} is not valid TOML: {err}") from None
    return from_dict(data)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


_COMMENTS = {
    "run": "What is trained. model_config_hash and ontology_hash are checked by every site.",
    "run.rounds": "federated rounds",
    "run.local_epochs": "local epochs per round at each site (ignored when local_steps > 0)",
    "run.local_steps": "local optimiser steps per round at each site (0 = use local_epochs)",
    "run.model": "model configuration name (tiny, small, vilref-rn50, vilref-vit-b16) or a JSON path",
    "run.eval_every": "zero-shot eval on each site's validation split, in the train reply, every N rounds",
    "sites": "Who takes part and how long the coordinator waits.",
    "sites.min_sites": "a round runs and is aggregated only when at least this many sites answered",
    "sites.wait_for_sites_s": "give up (with an error) if min_sites are not connected after this long",
    "sites.round_timeout_s": "hard limit for one round",
    "sites.straggler_grace_s": "after min_sites answered, wait at most this long for the others",
    "strategy": "Aggregation: fedavg (weighted by examples), fedprox, fedadam, fedmedian, fedtrimmedavg.",
    "safety": "Updates with NaN/Inf, or a norm above these limits, are rejected and recorded.",
    "safety.max_update_norm": "absolute L2 norm limit of (site weights - global weights)",
    "safety.max_norm_ratio": "reject an update whose norm exceeds this multiple of the round's median",
    "privacy": "Site-level differential privacy: mode = none | site-server-fixed | site-client-fixed | "
    "site-server-adaptive | site-client-adaptive, noise-multiplier, clipping-norm, delta (docs/privacy.md).",
    "server": "Where the SuperLink listens; public_address is what hospitals dial (host:port).",
    "train": "Local training hyper-parameters sent to every site (TrainConfig fields).",
}


def render_run_toml(cfg: RunConfig) -> str:
    """run.toml text with a comment on every section and the keys people change most."""
    lines = ["# vilref-fed run configuration. Edit, then `vilref-server start --dir DIR`.", ""]
    d = cfg.to_dict()
    for sec in [*_SECTIONS, "privacy", "train"]:
        if sec in _COMMENTS:
            lines.append(f"# {_COMMENTS[sec]}")
        lines.append(f"[{sec}]")
        for k, v in d[sec].items():
            c = _COMMENTS.get(f"{sec}.{k}")
            lines.append(f"{k} = {_toml_value(v)}" + (f"  # {c}" if c else ""))
        lines.append("")
    return "\n".join(lines)


def save_run_config(cfg: RunConfig, path: Path) -> None:
    cfg.validate()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_run_toml(cfg), encoding="utf-8")
    tmp.replace(path)
