"""What the ServerApp does for one submission: resume or start, run the rounds, record the outcome.

The run row (its uid) is created by `vilref-server start` before it submits to Flower; this code,
running inside `flwr-serverapp`, adds an attempt row for the Flower run id, finds the last completed
round of the run (database + checkpoint on disk), restores the weights and the server-optimiser
state, and continues after it: a round is never repeated once recorded as completed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from server import protocol
from server.checkpoints import (
    checkpoint_arrays,
    load_round_checkpoint,
    numpy_to_arrays,
    restore_strategy_state,
)
from server.consortium import open_consortium
from server.db import AttemptRow, CoordinatorDB, RunRow, utcnow
from server.federation import FederationError, RoundLoop
from server.strategies import build_strategy
from vilref_fed.logs import configure_logging, get_logger

log = get_logger("server.run")


def _wrap_privacy(
    strategy: Any, cfg: Any, db: CoordinatorDB, run_uid: str, n_sites: int, resuming: bool
) -> Any:
    privacy = cfg.privacy_config()
    if not privacy.site_level:
        return strategy
    from server.privacy import (
        accountant_state_from_records,
        ensure_privacy_schema,
        load_round_privacy,
        record_round_privacy,
        wrap_strategy,
    )

    ensure_privacy_schema(db.engine)
    state = None
    if resuming:
        state = accountant_state_from_records(load_round_privacy(db.engine, run_uid), privacy.delta)
    return wrap_strategy(
        strategy,
        privacy,
        num_sampled_sites=max(n_sites, 1),
        population=n_sites,
        recorder=lambda rp: record_round_privacy(db.engine, rp, run_uid),
        accountant_state=state,
    )


def run_training(grid: Any, run_config: dict[str, Any], flower_run_id: int | str) -> None:
    cdir = str(run_config.get("consortium-dir", ""))
    run_uid = str(run_config.get("run-uid", ""))
    if not cdir or not run_uid:
        raise FederationError(
            "this ServerApp is started by `vilref-server start`, which sets consortium-dir and run-uid"
        )
    c = open_consortium(cdir)
    configure_logging(logging.INFO, log_file=c.logs / "coordinator.log")
    cfg = c.config()
    db = CoordinatorDB(c.database_url(cfg))
    run = db.run_by_uid(run_uid)
    if run is None:
        raise FederationError(
            f"run {run_uid} is not in the coordinator database; start it with `vilref-server start`"
        )

    with db.session() as s:
        attempt = AttemptRow(run_id=run.id, flower_run_id=str(flower_run_id), status="running")
        s.add(attempt)
        r = s.get(RunRow, run.id)
        r.status = "running"
        s.flush()
        attempt_id = attempt.id

    try:
        _run_rounds(grid, c, cfg, db, run, attempt_id)
    except (KeyboardInterrupt, SystemExit):
        msg = "interrupted (the coordinator stopped); `vilref-server start --resume` continues it"
        _finish(db, run.id, attempt_id, "stopped", msg)
        db.event("run-stopped", msg, level="warn", run_uid=run.uid)
        raise
    except BaseException as err:
        msg = str(err) if isinstance(err, FederationError) else f"{type(err).__name__}: {err}"
        _finish(db, run.id, attempt_id, "failed", msg)
        db.event("run-failed", msg, level="error", run_uid=run.uid)
        log.error("run %s failed: %s", run.uid, msg)
        raise
    finally:
        db.close()


def _run_rounds(grid: Any, c: Any, cfg: Any, db: CoordinatorDB, run: RunRow, attempt_id: int) -> None:
    from server.global_model import initial_state, model_config_hash

    expected = model_config_hash(cfg.run.model)
    if cfg.run.model_config_hash and cfg.run.model_config_hash != expected:
        raise FederationError(
            f"model config {cfg.run.model!r} installed here (hash {expected[:12]}) differs from run.toml "
            f"(hash {cfg.run.model_config_hash[:12]}); reinstall the consortium's vilref-fed version "
            "or re-run init"
        )
    sites = db.active_sites()
    completed = db.completed_rounds(run.id)
    strategy = build_strategy(cfg)
    strategy = _wrap_privacy(strategy, cfg, db, run.uid, len(sites), resuming=bool(completed))
    if completed:
        last = completed[-1]
        data = load_round_checkpoint(Path(last.checkpoint or c.checkpoint_path(last.round_no)))
        if int(data["round"]) != last.round_no:
            raise FederationError(
                f"checkpoint {last.checkpoint} holds round {data['round']}, expected {last.round_no}"
            )
        named = checkpoint_arrays(data)
        restore_strategy_state(strategy, data.get("strategy_state", {}))
        start = last.round_no + 1
        db.event("resume", f"resuming after completed round {last.round_no}", run_uid=run.uid, round_no=start)
        log.info("resuming run %s after round %d", run.uid, last.round_no)
    else:
        t0 = time.monotonic()
        if cfg.run.task == "head":  # supervised head (docs/privacy.md): zero head + image encoder
            from server.head_task import initial_head_record

            named = OrderedDict((k, a.numpy()) for k, a in sorted(initial_head_record(cfg).items()))
        else:
            named = initial_state(cfg.run.model, cfg.run.seed)
        log.info("initial %s weights built in %.1f s", cfg.run.model, time.monotonic() - t0)
        start = 1
        db.event(
            "start",
            f"run {run.uid} starts: {cfg.run.rounds} rounds of {cfg.run.model}, "
            f"{cfg.strategy.name}, {len(sites)} registered sites",
            run_uid=run.uid,
        )
    with db.session() as s:
        a = s.get(AttemptRow, attempt_id)
        a.start_round = start

    spec = protocol.param_spec(named)
    arrays = numpy_to_arrays(protocol.pack(named, spec))
    loop = RoundLoop(
        grid=grid,
        cfg=cfg,
        db=db,
        run=run,
        attempt_id=attempt_id,
        strategy=strategy,
        checkpoint_path=c.checkpoint_path,
        audit_path=c.logs / "wire-audit.jsonl",
        base_config={
            protocol.TOOLKIT_VERSION: _toolkit_version(),
            protocol.PARAM_SPEC: protocol.spec_to_json(spec),
            protocol.PARAM_SPEC_HASH: protocol.spec_hash(spec),
            **_task_config(cfg),
        },
        spec=spec,
    )
    for round_no in range(start, cfg.run.rounds + 1):
        result = loop.run_round(round_no, arrays)
        arrays = result.arrays
    _finish(db, run.id, attempt_id, "completed", f"{cfg.run.rounds} rounds completed")
    db.event("run-completed", f"run {run.uid} completed {cfg.run.rounds} rounds", run_uid=run.uid)


def _task_config(cfg: Any) -> dict[str, Any]:
    if cfg.run.task != "head":
        return {}
    from server.head_task import head_round_config

    return head_round_config(cfg)


def _toolkit_version() -> str:
    import vilref_fed

    return vilref_fed.__version__


def _finish(db: CoordinatorDB, run_id: int, attempt_id: int, status: str, msg: str) -> None:
    with db.session() as s:
        a = s.get(AttemptRow, attempt_id)
        a.status, a.finished_at, a.message = status, utcnow(), msg
        r = s.get(RunRow, run_id)
        r.status, r.message = status, msg
        if status == "completed":
            r.finished_at = utcnow()
