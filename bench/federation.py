"""Cost of federation itself: round wall time against local training, bytes against the model, start-up.

A real consortium on loopback (LocalCluster: `vilref-server start` with TLS and node authentication,
one `vilref-client join` per synthetic hospital), the `tiny` model by default. For each round after
the first, from the coordinator database and the sites' own timings:

    round_overhead_ratio = round wall time / slowest site's local training time - 1

(both measured in the same run, so machine load hits them alike), and where the rest goes: the
site-side set-up inside the ClientApp (model build, loading the global weights, opening the site
dataset), the coordinator's checks + aggregation, and what is left (Flower's message polling and
the fresh `flwr-clientapp` process per message: imports of flwr, torch and transformers).
Bytes: Flower's own Fleet-API traffic counters of the run (SuperLink state database) divided per
site and round, against the fp32 size of the shared parameters. Start-up: from launching
`vilref-server start` to the SuperLink accepting TLS, and to round 1's model being sent.

    .venv/bin/python bench/federation.py --sites 3 --rounds 3 --local-steps 20

Prints JSON and writes bench/results/federation.json (keys: round_overhead_ratio, bytes_ratio,
startup_s, plus the breakdown).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import vilref_fed  # noqa: E402, F401

PROFILES = [("urban-dr", "en"), ("myopia-clinic", "zh"), ("glaucoma-center", "en")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--images", type=int, default=48, help="images per synthetic site")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--eval-every", type=int, default=0, help="zero-shot eval in the reply every N rounds (0: off)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--poll", type=float, default=0.5, help="coordinator's reply poll (sites.poll_interval_s)")
    p.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "federation.json")
    return p.parse_args(argv)


def make_sites(root: Path, n_sites: int, n_images: int) -> list[Path]:
    from vilref_fed.data.ingest import IngestOptions, ingest
    from vilref_fed.data.site import init_site
    from vilref_fed.data.synthetic import generate_site

    out = []
    for i in range(n_sites):
        profile, lang = PROFILES[i % len(PROFILES)]
        name = f"site-{chr(ord('a') + i)}"
        gen = root / f"gen-{name}"
        generate_site(gen, n_images, profile, seed=i + 1, dicom=True)
        site = init_site(root / name, name, language=lang, image_size=64)
        try:
            ingest(site, IngestOptions(dicom=[gen / "dicom"], reports=[gen / "reports.csv"]))
        finally:
            site.close()
        shutil.rmtree(gen)
        out.append(root / name)
    return out


def clientapp_cold_start_s(threads: int) -> float:
    """What a fresh `flwr-clientapp` pays before our handler runs: Python + flwr + our ClientApp +
    torch + the model/dataset modules it imports."""
    code = (
        "import time; t=time.perf_counter(); import flwr.supernode.cli.flwr_clientapp, client.app, torch; "
        "import vilref_fed.model, vilref_fed.train, vilref_fed.data.site_dataset; "
        "print(time.perf_counter()-t)"
    )
    from vilref_fed.offline import child_env

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=child_env({"OMP_NUM_THREADS": str(threads)}), cwd=ROOT)  # fmt: skip
    total = time.perf_counter() - t0
    return max(total, float(out.stdout.strip() or 0))


def fleet_traffic(superlink_db: Path) -> tuple[int, int]:
    """(bytes received from SuperNodes, bytes sent to them) of the run, Flower's own counters."""
    con = sqlite3.connect(f"file:{superlink_db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT bytes_recv, bytes_sent FROM run").fetchall()
    finally:
        con.close()
    return int(sum(r[0] or 0 for r in rows)), int(sum(r[1] or 0 for r in rows))


def _ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.rstrip("Z")).replace(tzinfo=dt.UTC).timestamp()


def round_timelines(cluster, status: dict) -> dict[int, dict[str, float]]:
    """Where each round's time went, for the site whose reply arrived last (the one the round waits
    for): wall-clock stamps of the coordinator (round start, model sent, reply pulled: database and
    wire audit) and of the site (handler entry and exit: its federation.log), all UTC."""
    run_uid = status["run"]["uid"]
    sent = {e["round"]: _ts(e["at"]) for e in status["events"] if e["kind"] == "round-sent"}
    audit = [
        json.loads(x) for x in (cluster.consortium.logs / "wire-audit.jsonl").read_text().splitlines() if x
    ]
    site_log: dict[tuple[str, int, str], float] = {}
    for name, member in cluster.members.items():
        for line in (member.site_dir / "logs" / "federation.log").read_text(encoding="utf-8").splitlines():
            stamp, _, rest = line.partition(" ")
            if not rest.startswith(f"run {run_uid} round "):
                continue
            n = int(rest.split()[3].rstrip(":"))
            kind = "recv" if "received the global model" in rest else "done" if ": done in" in rest else None
            if kind:
                site_log[(name, n, kind)] = _ts(stamp)
    out: dict[int, dict[str, float]] = {}
    for r in status["rounds"]:
        n = r["round"]
        replies = [a for a in audit if a["round"] == n and a["run_uid"] == run_uid]
        last = max(replies, key=lambda a: a["at"])
        site = last["site"]
        m = [s["metrics"] for s in r["sites"] if s["site"] == site][0]
        start = _ts(status_round_start(cluster, n))
        t_recv, t_done = site_log[(site, n, "recv")], site_log[(site, n, "done")]
        inside = m.get("setup_s", 0.0) + m["train_s"] + m.get("eval_s", 0.0)
        out[n] = {
            "before_send_s": sent[n] - start,
            "delivery_s": t_recv - sent[n],
            "setup_s": m.get("setup_s", 0.0),
            "train_s_last_site": m["train_s"],
            "eval_s": m.get("eval_s", 0.0),
            "handler_other_s": max(t_done - t_recv - inside, 0.0),
            "return_s": last["at"] - t_done,
            "after_last_reply_s": r["duration_s"] - (last["at"] - start),
        }
    return out


def status_round_start(cluster, round_no: int) -> str:
    from server.db import CoordinatorDB, RoundRow

    db = CoordinatorDB(cluster.consortium.database_url())
    try:
        with db.session() as s:
            row = s.query(RoundRow).filter(RoundRow.round_no == round_no).one()
            return row.started_at.isoformat()
    finally:
        db.close()


def main(argv: list[str] | None = None) -> dict:
    import torch

    from server.local_cluster import LocalCluster
    from vilref_fed.model import build_model, shared_state_dict

    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vilref-bench-fed-"))
    work.mkdir(parents=True, exist_ok=True)
    t_sites = time.perf_counter()
    sites = make_sites(work / "sites", args.sites, args.images)
    sites_s = time.perf_counter() - t_sites

    params = shared_state_dict(build_model(args.model))
    fp32_bytes = int(sum(v.numel() for v in params.values())) * 4

    cluster = LocalCluster(
        work / "run", sites, rounds=args.rounds, model=args.model, min_sites=args.sites, local_epochs=0,
        local_steps=args.local_steps, run={"eval_every": args.eval_every},
        train={"batch_size": args.batch, "queue_size": 256, "warmup_steps": 0},
        sites={"poll_interval_s": args.poll, "straggler_grace_s": 600.0, "round_timeout_s": 1800.0},
        env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)},
    )  # fmt: skip
    cluster.init()
    try:
        t_launch = time.time()
        cluster.start_coordinator()
        superlink_ready_s = time.time() - t_launch
        cluster.start_sites()
        status = cluster.wait_finished(timeout=3600)
    finally:
        cluster.close()
    if status["run"]["status"] != "completed":
        raise SystemExit(f"the benchmark run did not complete: {status['run']}")

    timeline = round_timelines(cluster, status)
    rounds = []
    for r in status["rounds"]:
        sites_m = [s["metrics"] for s in r["sites"] if s["status"] == "accepted"]
        tl = timeline[r["round"]]
        rounds.append({
            "round": r["round"],
            "wall_s": r["duration_s"],
            "slowest_train_s": max(m["train_s"] for m in sites_m),
            **tl,
        })  # fmt: skip
    steady = rounds[1:] if len(rounds) > 1 else rounds

    def med(key: str) -> float:
        return float(statistics.median(x[key] for x in steady))

    wall, train = med("wall_s"), med("slowest_train_s")
    recv, sent = fleet_traffic(cluster.consortium.superlink_db)
    per_site_round_up = recv / (args.sites * args.rounds)
    per_site_round_down = sent / (args.sites * args.rounds)
    payload_up = statistics.median(r["bytes_received"] / max(r["sites_sampled"], 1) for r in status["rounds"])
    cold = clientapp_cold_start_s(args.threads)
    t_first = min(_ts(e["at"]) for e in status["events"] if e["kind"] == "round-sent" and e["round"] == 1)
    result = {
        "round_overhead_ratio": wall / train - 1.0,
        "bytes_ratio": per_site_round_up / fp32_bytes,
        "startup_s": t_first - t_launch,
        "superlink_ready_s": superlink_ready_s,
        "round_wall_s": wall,
        "slowest_local_train_s": train,
        "overhead_s": wall - train,
        "overhead_breakdown_s": {
            "before_send_site_wait_and_push": med("before_send_s"),
            "delivery_supernode_poll_and_clientapp_start": med("delivery_s"),
            "site_setup_in_handler": med("setup_s"),
            "zero_shot_eval_in_reply": med("eval_s"),
            "handler_other": med("handler_other_s"),
            "reply_return_and_serverapp_poll": med("return_s"),
            "checks_aggregation_after_last_reply": med("after_last_reply_s"),
        },
        "clientapp_process_cold_start_s": cold,
        "bytes_up_per_site_round": per_site_round_up,
        "bytes_down_per_site_round": per_site_round_down,
        "download_ratio": per_site_round_down / fp32_bytes,
        "payload_up_per_site_round": payload_up,
        "fp32_shared_bytes": fp32_bytes,
        "shared_parameters": fp32_bytes // 4,
        "rounds": rounds,
        "config": {
            "model": args.model, "sites": args.sites, "rounds": args.rounds, "local_steps": args.local_steps,
            "batch": args.batch, "images_per_site": args.images, "eval_every": args.eval_every,
            "threads": args.threads, "poll_interval_s": args.poll, "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(), "site_setup_s": sites_s,
        },
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
