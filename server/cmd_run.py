"""`vilref-server` commands for a training run: start (with a live view), status, logs, export."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import typer

from server.common import console, err_console, fail

DIR_OPTION = typer.Option(Path("."), "--dir", "-d", help="Consortium directory.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-server app."""
    app.command("start")(start)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("export")(export)


def start(
    dir: Path = DIR_OPTION,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run after its last completed round."
    ),
    live: bool = typer.Option(True, "--live/--no-live", help="Show the live view (off: one line per event)."),
    port: int = typer.Option(0, "--port", help="Override server.port of run.toml."),
    resume_if_interrupted: bool = typer.Option(
        False,
        "--resume-if-interrupted",
        help="Continue the latest run if it did not complete, else start a new one (for service managers).",
    ),
) -> None:
    """Start the SuperLink (TLS, node authentication), submit the run and watch it until it ends."""
    from rich.live import Live

    from server.consortium import ConsortiumError, open_consortium
    from server.coordinator import Coordinator, CoordinatorError
    from server.flower_cli import FlowerCLIError
    from server.live import status_dict, status_renderable
    from server.processes import ProcessStartError, exit_with_parent
    from server.run_config import RunConfigError
    from vilref_fed.logs import configure_logging
    from vilref_fed.security import PKIError

    try:
        c = open_consortium(dir)
        configure_logging(log_file=c.logs / "coordinator.log")
        coord = Coordinator(c, port=port or None)
        if resume_if_interrupted and not resume:
            latest = coord.db.latest_run()
            resume = latest is not None and latest.status != "completed"
    except (ConsortiumError, RunConfigError) as err:
        fail(str(err))

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    exit_with_parent()
    outcome = None
    try:
        try:
            uid = coord.start(resume=resume)
        except (CoordinatorError, ProcessStartError, FlowerCLIError, PKIError) as err:
            fail(str(err).splitlines()[0] if isinstance(err, ProcessStartError) else str(err))
        console.print(
            f"Run [bold]{uid}[/] submitted (Flower run {coord.flower_run_id}); SuperLink on port "
            f"{coord.port}, started in {coord.startup_s:.1f} s. Ctrl-C stops it (resume with --resume)."
        )
        if live and sys.stdout.isatty():
            with Live(
                status_renderable(status_dict(coord.db, uid)), console=console, refresh_per_second=1
            ) as lv:
                outcome = coord.wait(on_tick=lambda: lv.update(status_renderable(status_dict(coord.db, uid))))
                lv.update(status_renderable(status_dict(coord.db, uid)))
        else:
            seen = {"rounds": 0}

            def _tick() -> None:
                done = [r for r in status_dict(coord.db, uid)["rounds"] if r["status"] == "completed"]
                for r in done[seen["rounds"] :]:
                    console.print(
                        f"round {r['round']} completed: {r['sites_accepted']} sites, "
                        f"{r['num_examples']} examples, {r['duration_s']:.1f} s, metrics {r['metrics']}"
                    )
                seen["rounds"] = len(done)

            outcome = coord.wait(on_tick=_tick)
            _tick()
    except KeyboardInterrupt:
        coord.stop_run()
        err_console.print("stopped; `vilref-server start --resume` continues after the last completed round")
        raise typer.Exit(130) from None
    finally:
        coord.close()
    if outcome.status == "completed":
        console.print(
            f"[bold green]Run {outcome.run_uid} completed[/] ({outcome.rounds_completed} rounds). "
            f"Export with `vilref-server export --dir {c.root} --round {outcome.rounds_completed} "
            "-o model.pt`."
        )
        return
    fail(
        f"run {outcome.run_uid} {outcome.status} after {outcome.rounds_completed} completed rounds: "
        f"{outcome.message}",
        code=1,
    )


def status(
    dir: Path = DIR_OPTION,
    run: str = typer.Option("", "--run", help="Run uid (default: the latest)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """Show the run's rounds, sites and warnings (works from another terminal while a run goes on)."""
    from server.consortium import ConsortiumError, open_consortium
    from server.coordinator import read_pid_file
    from server.db import CoordinatorDB
    from server.live import status_dict, status_renderable

    try:
        c = open_consortium(dir)
        db = CoordinatorDB(c.database_url())
    except ConsortiumError as err:
        fail(str(err))
    data = status_dict(db, run or None)
    running = read_pid_file(c)
    data["coordinator_running"] = bool(running)
    data["privacy"] = _privacy_lines(db, data["run"]["uid"] if data["run"] else None)
    if as_json:
        console.print_json(json.dumps(data, default=str))
        return
    if watch:
        from rich.live import Live

        with Live(status_renderable(data), console=console, refresh_per_second=1) as lv:
            try:
                while True:
                    time.sleep(2)
                    lv.update(status_renderable(status_dict(db, run or None)))
            except KeyboardInterrupt:
                return
    console.print(status_renderable(data))
    for line in data["privacy"]:
        console.print(line)
    console.print("coordinator: " + (f"running (pid {running['pid']})" if running else "not running"))


def _privacy_lines(db: object, run_uid: str | None) -> list[str]:
    try:
        from server.privacy import privacy_summary

        summary = privacy_summary(db.engine, run_uid)  # type: ignore[attr-defined]
    except Exception:  # the privacy table is optional
        return []
    return summary.lines() if summary.rows else []


def logs(
    dir: Path = DIR_OPTION,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until Ctrl-C."),
    lines: int = typer.Option(50, "--lines", "-n", help="Lines to show."),
    superlink: bool = typer.Option(False, "--superlink", help="Show the SuperLink's log instead."),
    events: bool = typer.Option(False, "--events", help="Show the database's event log instead."),
) -> None:
    """Print the coordinator log (or the SuperLink log, or recorded events)."""
    from server.consortium import ConsortiumError, open_consortium
    from server.db import CoordinatorDB

    try:
        c = open_consortium(dir)
    except ConsortiumError as err:
        fail(str(err))
    if events:
        for e in CoordinatorDB(c.database_url()).events(limit=lines):
            where = f" round {e.round_no}" if e.round_no else ""
            console.print(
                f"{e.at:%Y-%m-%d %H:%M:%S} {e.level:5} {e.kind}{where}: {e.message}", highlight=False
            )
        return
    path = c.logs / ("superlink.log" if superlink else "coordinator.log")
    if not path.exists():
        fail(f"{path} does not exist yet; it appears when `vilref-server start` runs")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.readlines()[-lines:]:
            console.print(line.rstrip("\n"), highlight=False, markup=False)
        if not follow:
            return
        try:
            while True:
                line = f.readline()
                if line:
                    console.print(line.rstrip("\n"), highlight=False, markup=False)
                else:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            return


def export(
    dir: Path = DIR_OPTION,
    round_no: int = typer.Option(0, "--round", help="Round to export (default: the last completed)."),
    out: Path = typer.Option(..., "-o", "--out", help="Model file to write (e.g. model.pt)."),
    run: str = typer.Option("", "--run", help="Run uid (default: the latest)."),
) -> None:
    """Write the global model of a completed round as a checkpoint that vilref-client loads."""
    from server.checkpoints import CheckpointError
    from server.consortium import ConsortiumError, open_consortium
    from server.export import ExportError, export_round

    try:
        c = open_consortium(dir)
        path, meta = export_round(c, out, round_no or None, run or None)
    except (ConsortiumError, ExportError, CheckpointError) as err:
        fail(str(err))
    console.print(
        f"Wrote {path}: round {meta['round']} of run {meta['run_uid']} "
        f"({meta['model']}, sites {', '.join(meta['sites'])})."
    )
