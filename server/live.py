"""What the coordinator sees: rounds, sites and events, read from the coordinator database.

Used by the live view of `vilref-server start`, by `vilref-server status` (from any terminal, even
while a run is going: SQLite WAL lets readers in), and by `make demo`. Reading only the database
means the view never touches Flower internals and works the same for a finished run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from server.db import CoordinatorDB

SHOWN_METRICS = ("train_loss", "val_macro_auc", "val_map")


def status_dict(db: CoordinatorDB, run_uid: str | None = None) -> dict[str, Any]:
    run = db.run_by_uid(run_uid) if run_uid else db.latest_run()
    sites = [
        {
            "name": s.name,
            "status": s.status,
            "last_state": s.last_state,
            "last_round": s.last_round,
            "last_seen": s.last_seen_at.isoformat(timespec="seconds") + "Z" if s.last_seen_at else None,
        }
        for s in db.all_sites()
    ]
    if run is None:
        return {"run": None, "rounds": [], "sites": sites, "events": []}
    rounds = []
    for r in db.rounds(run.id):
        rounds.append(
            {
                "round": r.round_no,
                "status": r.status,
                "duration_s": r.duration_s,
                "sites_sampled": r.sites_sampled,
                "sites_accepted": r.sites_accepted,
                "num_examples": r.num_examples,
                "bytes_sent": r.bytes_sent,
                "bytes_received": r.bytes_received,
                "metrics": r.metrics,
                "message": r.message,
                "sites": [
                    {
                        "site": s.site_name,
                        "status": s.status,
                        "num_examples": s.num_examples,
                        "metrics": s.metrics,
                        "update_norm": s.update_norm,
                        "reason": s.reason,
                    }
                    for s in db.round_sites(r.id)
                ],
            }
        )
    events = [
        {
            "at": e.at.isoformat(timespec="milliseconds") + "Z",
            "level": e.level,
            "kind": e.kind,
            "round": e.round_no,
            "site": e.site_name,
            "message": e.message,
        }
        for e in db.events(run.uid, 50)
    ]
    return {
        "run": {
            "uid": run.uid,
            "status": run.status,
            "rounds_planned": run.rounds_planned,
            "rounds_completed": sum(1 for r in rounds if r["status"] == "completed"),
            "message": run.message,
            "created_at": run.created_at.isoformat(timespec="seconds") + "Z",
        },
        "rounds": rounds,
        "sites": sites,
        "events": events,
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    t = dt.datetime.fromisoformat(ts.rstrip("Z"))
    s = (dt.datetime.now(dt.UTC).replace(tzinfo=None) - t).total_seconds()
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def status_renderable(data: dict[str, Any], title: str = "vilref-fed coordinator") -> RenderableType:
    run = data["run"]
    parts: list[RenderableType] = []
    if run is None:
        parts.append(Text("No run yet. Start one with `vilref-server start`.", style="yellow"))
    else:
        style = {"completed": "green", "failed": "red", "stopped": "yellow"}.get(run["status"], "cyan")
        parts.append(
            Text.assemble(
                (f"{title}  ", "bold"),
                ("run ", ""),
                (run["uid"], "bold"),
                ("  status ", ""),
                (run["status"], f"bold {style}"),
                (f"  rounds {run['rounds_completed']}/{run['rounds_planned']}", ""),
            )
        )
        if run.get("message") and run["status"] in ("failed", "stopped"):
            parts.append(Text(run["message"], style=style))
        t = Table(expand=False)
        for col in ("round", "status", "sites", "examples", *SHOWN_METRICS, "time (s)", "MB down/up"):
            t.add_column(col, justify="right")
        for r in data["rounds"]:
            m = r["metrics"]
            t.add_row(
                str(r["round"]),
                r["status"],
                f"{r['sites_accepted']}/{r['sites_sampled']}",
                str(r["num_examples"]),
                *(_fmt(m.get(k)) for k in SHOWN_METRICS),
                _fmt(r["duration_s"], 1),
                f"{r['bytes_sent'] / 1e6:.1f}/{r['bytes_received'] / 1e6:.1f}",
            )
        parts.append(t)
    st = Table(title="sites", expand=False)
    for col in ("site", "state", "last seen", "last round"):
        st.add_column(col)
    for s in data["sites"]:
        if s["status"] != "active":
            continue
        st.add_row(s["name"], s["last_state"] or "-", _ago(s["last_seen"]), _fmt(s["last_round"]))
    parts.append(st)
    warn = [e for e in data.get("events", []) if e["level"] in ("warn", "error")][-5:]
    for e in warn:
        parts.append(
            Text(f"[{e['kind']}] {e['message']}", style="red" if e["level"] == "error" else "yellow")
        )
    return Group(*parts)
