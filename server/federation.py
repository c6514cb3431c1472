"""The round loop the ServerApp runs: wait for sites, train, check, aggregate, checkpoint, record.

Why not `Strategy.start()`: it waits for nodes forever, waits for every reply until one timeout,
has no resume, and averages whatever arrives. A consortium needs instead:
- a bounded wait for sites, with an error that names who is missing;
- a round that proceeds with the sites that answered once at least `min_sites` did (stragglers get
  `straggler_grace_s` more; a dead site is not waited for until the round timeout);
- every reply checked (update_checks.py) and every rejection recorded;
- the global weights and server-optimiser state checkpointed after every round, and the round
  recorded in the database, so `--resume` continues after the last completed round.
Flower strategies still do the sampling message construction and the aggregation arithmetic.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from sqlalchemy import select

from server import protocol
from server.checkpoints import arrays_to_numpy, save_round_checkpoint
from server.db import CoordinatorDB, RoundRow, RoundSiteRow, RunRow, SiteRow, utcnow
from server.run_config import RunConfig
from server.update_checks import Verdict, judge_norms, payload_bytes, reply_structure, structural_check
from vilref_fed.logs import get_logger

log = get_logger("server.federation")


class FederationError(RuntimeError):
    """The run cannot go on (not enough sites, not enough valid updates); the message says why."""


class _NodesGrid(Grid):
    """A view of the real grid whose node list is the set of sites chosen for this round, so that
    Flower's samplers never block waiting for nodes (they wait forever)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._g = grid
        self._ids = list(node_ids)

    def set_run(self, run: Any) -> None:  # pragma: no cover - delegated
        self._g.set_run(run)

    @property
    def run(self) -> Any:  # pragma: no cover - delegated
        return self._g.run

    def create_message(self, *a: Any, **k: Any) -> Message:  # pragma: no cover - delegated
        return self._g.create_message(*a, **k)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        return self._g.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        return self._g.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError("the round loop sends and receives itself")  # pragma: no cover


@dataclass
class SiteOutcome:
    node_id: int
    site: str
    status: str  # accepted | rejected | failed | refused | timeout
    reason: str | None = None
    verdict: Verdict | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RoundResult:
    round_no: int
    arrays: ArrayRecord
    outcomes: list[SiteOutcome]
    metrics: dict[str, float]
    duration_s: float
    bytes_sent: int
    bytes_received: int
    num_examples: int


@dataclass
class RoundLoop:
    grid: Grid
    cfg: RunConfig
    db: CoordinatorDB
    run: RunRow
    attempt_id: int
    strategy: Any
    checkpoint_path: Callable[[int], Path]
    audit_path: Path | None = None
    base_config: dict[str, Any] = field(default_factory=dict)
    spec: protocol.ParamSpec | None = None  # packed wire format (server/protocol.py); None: as named
    _first_round_of_attempt: bool = True

    # ------------------------------------------------------------------ sites
    def _site_names(self) -> dict[str, SiteRow]:
        return {s.name: s for s in self.db.active_sites()}

    def wait_for_sites(self, round_no: int) -> dict[int, str]:
        """Node ids -> site names of the registered sites online now, once enough are online."""
        s = self.cfg.sites
        t0 = time.monotonic()
        hard_deadline = t0 + s.wait_for_sites_s
        soft_deadline = t0 + (s.wait_for_sites_s if self._first_round_of_attempt else s.straggler_grace_s)
        announced = False
        while True:
            known = self._site_names()
            online: dict[int, str] = {}
            for n in self.grid.get_nodes():
                if n.name in known and n.status == "online":
                    online[int(n.node_id)] = n.name
            self._mark_seen(online)
            now = time.monotonic()
            missing = sorted(set(known) - set(online.values()))
            if not missing:
                log.info("round %d: all %d sites online after %.1f s", round_no, len(online), now - t0)
                return online
            if len(online) >= s.min_sites and now >= min(soft_deadline, hard_deadline):
                self.db.event(
                    "sites-missing",
                    f"round {round_no} starts without {', '.join(missing)}",
                    level="warn",
                    run_uid=self.run.uid,
                    round_no=round_no,
                )
                return online
            if now >= hard_deadline:
                msg = (
                    f"only {len(online)} of the minimum {s.min_sites} sites connected after "
                    f"{s.wait_for_sites_s:.0f} s (waiting for {', '.join(missing)}); each hospital must run "
                    "`vilref-client join`, or lower sites.min_sites in run.toml"
                )
                self.db.event("sites-timeout", msg, level="error", run_uid=self.run.uid, round_no=round_no)
                raise FederationError(msg)
            if not announced:
                log.info(
                    "round %d: %d/%d sites online, waiting for %s",
                    round_no,
                    len(online),
                    len(known),
                    ", ".join(missing),
                )
                announced = True
            time.sleep(s.poll_interval_s)

    def _mark_seen(self, online: dict[int, str]) -> None:
        if not online:
            return
        with self.db.session() as ses:
            for node_id, name in online.items():
                row = ses.scalars(select(SiteRow).where(SiteRow.name == name)).first()
                if row is not None:
                    row.last_seen_at = utcnow()
                    row.last_state = "online"
                    row.node_id = str(node_id)

    def _refresh_states(self, round_no: int, nodes: dict[int, str], pending: set[int]) -> None:
        online = {int(n.node_id) for n in self.grid.get_nodes() if n.status == "online"}
        with self.db.session() as ses:
            for node_id, name in nodes.items():
                row = ses.scalars(select(SiteRow).where(SiteRow.name == name)).first()
                if row is None:
                    continue
                if node_id in online:
                    row.last_seen_at = utcnow()
                    row.last_state = f"training r{round_no}" if node_id in pending else f"done r{round_no}"
                else:
                    row.last_state = "offline"

    # ------------------------------------------------------------------ one round
    def train_config(self, round_no: int) -> ConfigRecord:
        r = self.cfg.run
        evaluate = r.eval_every > 0 and (round_no % r.eval_every == 0 or round_no == r.rounds)
        values: dict[str, Any] = {
            protocol.RUN_UID: self.run.uid,
            protocol.EVALUATE: bool(evaluate),
            protocol.LOCAL_EPOCHS: int(r.local_epochs),
            protocol.LOCAL_STEPS: int(r.local_steps),
            protocol.SEED: int(r.seed),
            protocol.PROMPT_LANGUAGE: r.prompt_language,
            protocol.MODEL_NAME: r.model,
            protocol.MODEL_CONFIG_HASH: r.model_config_hash,
            protocol.ONTOLOGY_HASH: r.ontology_hash,
        }
        values.update(self.base_config)
        for k, v in self.cfg.train.items():
            values[protocol.TRAIN_PREFIX + k] = v
        return ConfigRecord(values)

    def run_round(self, round_no: int, arrays: ArrayRecord) -> RoundResult:
        s = self.cfg.sites
        t_start = time.monotonic()
        round_id = self._begin_round(round_no)
        nodes = self.wait_for_sites(round_no)
        self._first_round_of_attempt = False
        global_np = arrays_to_numpy(arrays)

        messages = list(
            self.strategy.configure_train(
                round_no, arrays, self.train_config(round_no), _NodesGrid(self.grid, list(nodes))
            )
        )
        for m in messages:
            m.metadata.ttl = float(s.round_timeout_s + 60.0)
        down = payload_bytes(arrays)
        ids = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}
        for mid, m in zip(ids, messages, strict=True):
            if mid:
                pending[mid] = int(m.metadata.dst_node_id)
        with self.db.session() as ses:
            row = ses.get(RoundRow, round_id)
            row.sites_sampled = len(pending)
        self.db.event(
            "round-sent",
            f"round {round_no}: global model sent to {len(pending)} sites",
            run_uid=self.run.uid,
            round_no=round_no,
        )
        log.info("round %d: sent the global model to %d sites", round_no, len(pending))

        outcomes: dict[int, SiteOutcome] = {}
        t_min_reached: float | None = None
        t_seen = time.monotonic()
        pull_s = 0.0
        while pending:
            if time.monotonic() - t_seen > 10.0:  # keep "last seen" fresh for status/live views
                t_seen = time.monotonic()
                self._refresh_states(round_no, nodes, set(pending.values()))
            t_pull = time.monotonic()
            pulled = list(self.grid.pull_messages(list(pending)))
            pull_s += time.monotonic() - t_pull
            for reply in pulled:
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                node = pending.pop(mid)
                outcomes[node] = self._classify(
                    round_no, node, nodes.get(node, str(node)), reply, global_np, down
                )
            accepted = sum(1 for o in outcomes.values() if o.status == "accepted")
            now = time.monotonic()
            if accepted >= s.min_sites and t_min_reached is None:
                t_min_reached = now
            if not pending:
                break
            if t_min_reached is not None and now - t_min_reached >= s.straggler_grace_s:
                reason = (
                    f"no reply within straggler_grace_s={s.straggler_grace_s:g} s "
                    f"after {accepted} sites answered"
                )
                break
            if now - t_start >= s.round_timeout_s:
                reason = f"no reply within round_timeout_s={s.round_timeout_s:g} s"
                break
            time.sleep(s.poll_interval_s)
        for node in pending.values():
            outcomes[node] = SiteOutcome(node, nodes.get(node, str(node)), "timeout", reason, bytes_sent=down)

        verdicts = [o.verdict for o in outcomes.values() if o.verdict is not None]
        judge_norms(verdicts, self.cfg.safety.max_update_norm, self.cfg.safety.max_norm_ratio)
        for o in outcomes.values():
            if o.status == "accepted" and o.verdict is not None and not o.verdict.ok:
                o.status, o.reason = "rejected", o.verdict.reason
        for o in outcomes.values():
            if o.status != "accepted":
                level = "warn" if o.status in ("rejected", "refused") else "info"
                self.db.event(
                    f"site-{o.status}",
                    f"{o.site}: {o.reason}",
                    level=level,
                    run_uid=self.run.uid,
                    round_no=round_no,
                    site_name=o.site,
                )
                log.warning("round %d: %s %s: %s", round_no, o.site, o.status, o.reason)

        good = [o for o in outcomes.values() if o.status == "accepted"]
        if len(good) < s.min_sites:
            msg = (
                f"round {round_no}: only {len(good)} valid updates, the minimum is {s.min_sites} "
                f"({'; '.join(f'{o.site}: {o.status}' for o in outcomes.values() if o.status != 'accepted')})"
            )
            self._fail_round(round_id, outcomes, msg, t_start)
            raise FederationError(msg)

        canonical = [
            Message(
                RecordDict(
                    {
                        protocol.ARRAYS: o.verdict.arrays,  # type: ignore[union-attr]
                        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: o.verdict.num_examples}),  # type: ignore[union-attr]
                    }
                ),
                dst_node_id=o.node_id,
                message_type=MessageType.TRAIN,
            )
            for o in good
        ]
        t_agg = time.monotonic()
        new_arrays, _ = self.strategy.aggregate_train(round_no, canonical)
        if new_arrays is None:
            msg = f"round {round_no}: the strategy produced no aggregate"
            self._fail_round(round_id, outcomes, msg, t_start)
            raise FederationError(msg)
        bad = [k for k, a in new_arrays.items() if not _finite(a.numpy())]
        if bad:
            msg = f"round {round_no}: aggregate has non-finite values in {bad[:3]}; global model kept"
            self._fail_round(round_id, outcomes, msg, t_start)
            raise FederationError(msg)
        # Keep the global dtypes (numpy averaging may promote) and key order.
        new_arrays = _match_dtypes(new_arrays, global_np)

        metrics = aggregate_metrics([o.verdict for o in good])  # type: ignore[misc]
        metrics["server_aggregate_s"] = time.monotonic() - t_agg
        metrics["server_pull_s"] = pull_s
        trained = [o.verdict for o in outcomes.values() if o.verdict is not None]
        metrics["slowest_train_s"] = max(float(v.metrics.get("train_s", 0.0)) for v in trained)
        duration = time.monotonic() - t_start
        result = RoundResult(
            round_no=round_no,
            arrays=new_arrays,
            outcomes=list(outcomes.values()),
            metrics=metrics,
            duration_s=duration,
            bytes_sent=sum(o.bytes_sent for o in outcomes.values()),
            bytes_received=sum(o.bytes_received for o in outcomes.values()),
            num_examples=sum(o.verdict.num_examples for o in good),  # type: ignore[union-attr]
        )
        new_np = arrays_to_numpy(new_arrays)
        named = protocol.unpack(new_np, self.spec) if self.spec is not None else new_np
        ckpt = save_round_checkpoint(
            self.checkpoint_path(round_no),
            round_no,
            named,
            self.strategy,
            meta={
                "run_uid": self.run.uid,
                "model": self.cfg.run.model,
                "model_config_hash": self.cfg.run.model_config_hash,
                "ontology_hash": self.cfg.run.ontology_hash,
                "prompt_language": self.cfg.run.prompt_language,
                "strategy": self.cfg.strategy.name,
                "sites": sorted(o.site for o in good),
                "metrics": metrics,
            },
        )
        self._complete_round(round_id, result, ckpt)
        log.info(
            "round %d completed in %.1f s with %s",
            round_no,
            duration,
            ", ".join(sorted(o.site for o in good)),
        )
        return result

    # ------------------------------------------------------------------ replies
    def _classify(
        self, round_no: int, node: int, site: str, reply: Message, global_np: dict, down: int
    ) -> SiteOutcome:
        self._audit(round_no, site, reply)
        if reply.has_error():
            reason = protocol.refusal_reason(reply.error.reason)
            status = "refused" if "SiteRefusal" in (reply.error.reason or "") else "failed"
            return SiteOutcome(node, site, status, reason[:500], bytes_sent=down)
        up = sum(payload_bytes(r) for r in reply.content.array_records.values())
        verdict = structural_check(reply, global_np, self.spec)
        status = "accepted" if verdict.ok else "rejected"
        return SiteOutcome(node, site, status, verdict.reason, verdict, bytes_sent=down, bytes_received=up)

    def _audit(self, round_no: int, site: str, reply: Message) -> None:
        if self.audit_path is None:
            return
        entry = {
            "run_uid": self.run.uid,
            "round": round_no,
            "site": site,
            "at": time.time(),
            "reply": reply_structure(reply),
        }
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ database
    def _begin_round(self, round_no: int) -> int:
        with self.db.session() as ses:
            row = ses.scalars(
                select(RoundRow).where(RoundRow.run_id == self.run.id, RoundRow.round_no == round_no)
            ).first()
            if row is None:
                row = RoundRow(run_id=self.run.id, round_no=round_no)
                ses.add(row)
            else:  # a failed or interrupted earlier try of this round: start it afresh
                for site_row in list(row.sites):
                    ses.delete(site_row)
            row.status, row.attempt_id, row.started_at = "running", self.attempt_id, utcnow()
            row.finished_at, row.duration_s, row.message, row.checkpoint = None, None, None, None
            ses.flush()
            return row.id

    def _site_rows(
        self, round_id: int, outcomes: dict[int, SiteOutcome] | list[SiteOutcome]
    ) -> list[RoundSiteRow]:
        items = outcomes.values() if isinstance(outcomes, dict) else outcomes
        rows = []
        for o in items:
            v = o.verdict
            rows.append(
                RoundSiteRow(
                    round_id=round_id,
                    site_name=o.site,
                    node_id=str(o.node_id),
                    status=o.status,
                    num_examples=v.num_examples if v else 0,
                    metrics_json=json.dumps({k: _json_num(x) for k, x in (v.metrics if v else {}).items()}),
                    bytes_sent=o.bytes_sent,
                    bytes_received=o.bytes_received,
                    update_norm=v.update_norm
                    if v and v.update_norm is not None and math.isfinite(v.update_norm)
                    else None,
                    reason=o.reason,
                )
            )
        return rows

    def _fail_round(self, round_id: int, outcomes: dict[int, SiteOutcome], msg: str, t_start: float) -> None:
        with self.db.session() as ses:
            row = ses.get(RoundRow, round_id)
            row.status, row.message, row.finished_at = "failed", msg, utcnow()
            row.duration_s = time.monotonic() - t_start
            ses.add_all(self._site_rows(round_id, outcomes))
        self.db.event("round-failed", msg, level="error", run_uid=self.run.uid)

    def _complete_round(self, round_id: int, r: RoundResult, ckpt: Path) -> None:
        with self.db.session() as ses:
            row = ses.get(RoundRow, round_id)
            row.status = "completed"
            row.finished_at = utcnow()
            row.duration_s = r.duration_s
            row.sites_accepted = sum(1 for o in r.outcomes if o.status == "accepted")
            row.num_examples = r.num_examples
            row.bytes_sent = r.bytes_sent
            row.bytes_received = r.bytes_received
            row.metrics_json = json.dumps({k: _json_num(v) for k, v in r.metrics.items()})
            row.checkpoint = str(ckpt)
            ses.add_all(self._site_rows(round_id, r.outcomes))
            for o in r.outcomes:
                site = ses.scalars(select(SiteRow).where(SiteRow.name == o.site)).first()
                if site is not None and o.status == "accepted":
                    site.last_round = r.round_no
                    site.last_seen_at = utcnow()
                    site.last_state = "trained"


_SUMMED = frozenset({"val_examples"})


def aggregate_metrics(verdicts: list[Verdict]) -> dict[str, float]:
    """Example-weighted mean of each metric over the sites that reported a finite value (counts are
    summed)."""
    out: dict[str, float] = {}
    keys = sorted({k for v in verdicts for k in v.metrics})
    for k in keys:
        if k == protocol.NUM_EXAMPLES:
            out["num_examples"] = float(sum(v.num_examples for v in verdicts))
            continue
        if k in _SUMMED:
            vals = [v.metrics[k] for v in verdicts if k in v.metrics and math.isfinite(v.metrics[k])]
            out[k] = float(sum(vals))
            continue
        pairs = [
            (v.metrics[k], v.num_examples) for v in verdicts if k in v.metrics and math.isfinite(v.metrics[k])
        ]
        if pairs:
            w = sum(n for _, n in pairs)
            out[k] = sum(x * n for x, n in pairs) / w
    return out


def _finite(a: Any) -> bool:
    import numpy as np

    return bool(np.all(np.isfinite(a)))


def _match_dtypes(rec: ArrayRecord, ref: dict) -> ArrayRecord:
    from collections import OrderedDict

    import numpy as np
    from flwr.app import Array

    out = OrderedDict()
    for k, g in ref.items():
        a = rec[k].numpy()
        out[k] = Array(np.array(a, dtype=g.dtype, order="C", copy=True))
    return ArrayRecord(out)


def _json_num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None
