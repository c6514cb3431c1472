"""`make demo`: a whole consortium on this machine, end to end, with nothing simulated.

What a coordinator and three hospitals' IT teams would type, run for them in order:
  1. each hospital gets a synthetic fundus export (OP DICOM files) and a report dump (one in Chinese);
  2. each hospital creates its site directory and ingests the export (`vilref-client init/ingest`);
  3. the coordinator creates the consortium (CA, TLS certificate, run.toml), registers the three
     hospitals' node keys, starts the SuperLink (TLS + node authentication) and the run; each
     hospital joins with `vilref-client join` (a SuperNode) — all real processes on loopback;
  4. the global model is exported, and for comparison each hospital trains alone for the same number
     of local steps (`vilref-client train`);
  5. every model is scored zero-shot on held-out synthetic images of every hospital.

The demo lives in `server/` because it drives `server.local_cluster`; the hospital steps are the
real `vilref-client` console commands run as subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

import vilref_fed  # noqa: F401  (offline environment first)
from vilref_fed.offline import child_env

console = Console()


@dataclass(frozen=True)
class DemoSite:
    name: str
    profile: str
    language: str


SITES = (
    DemoSite("hospital-a", "urban-dr", "en"),
    DemoSite("hospital-b", "myopia-clinic", "zh"),
    DemoSite("hospital-c", "glaucoma-center", "en"),
)


def _run(step: str, args: list[str], log: Path) -> None:
    """Run one CLI command as the hospital or coordinator would; on failure show its log tail and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("ab") as fh:
        fh.write(f"$ {' '.join(args)}\n".encode())
        fh.flush()
        env = child_env({"COLUMNS": "120"})
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        console.print(f"[red]{step} failed (exit {rc}); last lines of {log}:[/]\n{tail}")
        raise typer.Exit(1)
    console.print(f"  [green]✓[/] {step} [dim]({time.monotonic() - t0:.1f} s)[/]")


def _client(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


def _progress_table(status: dict, rounds: int) -> Table:
    t = Table(title=f"Federated training — {rounds} rounds", expand=False)
    t.add_column("round", justify="right")
    t.add_column("status")
    t.add_column("sites accepted", justify="right")
    t.add_column("examples", justify="right")
    t.add_column("train loss", justify="right")
    t.add_column("val zero-shot AUC", justify="right")
    t.add_column("seconds", justify="right")
    for r in status.get("rounds", []):
        m = r.get("metrics") or {}
        loss, auc = m.get("train_loss"), m.get("val_macro_auc")
        t.add_row(
            str(r.get("round")),
            str(r.get("status")),
            f"{r.get('sites_accepted') or 0}/{r.get('sites_sampled') or 0}",
            str(r.get("num_examples") or ""),
            f"{loss:.3f}" if isinstance(loss, (int, float)) else "",
            f"{auc:.3f}" if isinstance(auc, (int, float)) else "",
            f"{r['duration_s']:.1f}" if isinstance(r.get("duration_s"), (int, float)) else "",
        )
    run = status.get("run") or {}
    online = sum(1 for s in status.get("sites", []) if s.get("status") not in (None, "offline", "removed"))
    t.caption = f"run: {run.get('status', 'starting')} · sites seen: {online}/{len(status.get('sites', []))}"
    return t


def main(
    workdir: Path = typer.Option(Path("demo-run"), help="Scratch directory (deleted and recreated)."),
    n_per_site: int = typer.Option(400, help="Synthetic fundus images per hospital."),
    n_test: int = typer.Option(150, help="Held-out synthetic images per hospital for the zero-shot table."),
    rounds: int = typer.Option(4, help="Federated rounds."),
    local_steps: int = typer.Option(60, help="Local training steps per site per round."),
    batch_size: int = typer.Option(32, help="Local batch size."),
    model: str = typer.Option("tiny", help="Model configuration."),
    seed: int = typer.Option(0, help="Seed for data and training."),
) -> None:
    """Run the whole product here: three synthetic hospitals, a TLS federation, zero-shot results."""
    from server.local_cluster import LocalCluster

    t_start = time.monotonic()
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    logs = workdir / "logs"
    train = {"batch_size": batch_size, "lr": 2e-3, "warmup_steps": 20, "queue_size": 256,
             "weight_decay": 0.01}

    console.rule("[bold]1. Three hospitals receive a fundus export and a report dump (synthetic)")
    for i, s in enumerate(SITES):
        data = workdir / "exports" / s.name
        _run(
            f"{s.name}: {n_per_site} OP DICOM images + {s.language} reports ({s.profile})",
            _client("synth", "--out", str(data), "--n", str(n_per_site), "--profile", s.profile,
                    "--seed", str(seed + 10 * i), "--dicom"),
            logs / f"synth-{s.name}.log",
        )  # fmt: skip
        _run(
            f"{s.name}: {n_test} held-out test images",
            _client("synth", "--out", str(workdir / "heldout" / s.name), "--n", str(n_test), "--profile",
                    s.profile, "--seed", str(seed + 10 * i + 1000)),
            logs / f"synth-test-{s.name}.log",
        )  # fmt: skip

    console.rule("[bold]2. Each hospital creates its site and ingests the export")
    site_dirs = []
    for s in SITES:
        site = workdir / "sites" / s.name
        site_dirs.append(site)
        _run(f"{s.name}: vilref-client init", _client("init", "--site-dir", str(site), "--name", s.name,
                                                       "--language", s.language), logs / f"init-{s.name}.log")
        _run(
            f"{s.name}: vilref-client ingest",
            _client("ingest", "--site-dir", str(site), "--dicom", str(workdir / "exports" / s.name / "dicom"),
                    "--reports", str(workdir / "exports" / s.name / "reports.csv")),
            logs / f"ingest-{s.name}.log",
        )  # fmt: skip
        out = subprocess.run(_client("status", "--site-dir", str(site), "--json"), capture_output=True,
                             text=True, env=child_env())  # fmt: skip
        st = json.loads(out.stdout) if out.returncode == 0 else {}
        console.print(
            f"    accepted {st.get('accepted', '?')} images, {st.get('reports_linked', '?')} reports linked, "
            f"quarantined {sum((st.get('quarantined') or {}).values())}"
        )

    console.rule("[bold]3. The coordinator starts a TLS federation; the hospitals join with their node keys")
    cluster = LocalCluster(
        workdir / "federation", site_dirs, rounds=rounds, model=model, min_sites=len(SITES),
        local_steps=local_steps, train=train, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    t_fed = time.monotonic()
    with cluster:
        cluster.start_coordinator()
        cluster.start_sites()
        console.print(f"  SuperLink on https://{cluster.address} (TLS + node auth); 3 SuperNodes started")
        with Live(_progress_table(cluster.status(), rounds), console=console, refresh_per_second=2) as live:
            while cluster.coordinator is not None and cluster.coordinator.alive():
                live.update(_progress_table(cluster.status(), rounds))
                if time.monotonic() - t_fed > 3600:
                    console.print("[red]the federation did not finish within an hour[/]")
                    raise typer.Exit(1)
                time.sleep(1.0)
            final = cluster.status()
            live.update(_progress_table(final, rounds))
        if (final.get("run") or {}).get("status") != "completed":
            console.print(f"[red]the run did not complete: {final.get('run')}[/]")
            console.print(cluster.coordinator.log_tail(25) if cluster.coordinator else "")
            raise typer.Exit(1)
        global_model = cluster.export(workdir / "models" / "global.pt")
    console.print(f"  global model exported to {global_model} [dim]({time.monotonic() - t_fed:.0f} s)[/]")

    console.rule("[bold]4. For comparison, each hospital trains alone for the same number of steps")
    alone: dict[str, Path] = {}
    for s, site in zip(SITES, site_dirs, strict=True):
        out = workdir / "models" / f"alone-{s.name}"
        _run(
            f"{s.name}: vilref-client train ({rounds * local_steps} steps)",
            _client("train", "--site-dir", str(site), "--model", model,
                    "--max-steps", str(rounds * local_steps),
                    "--batch-size", str(batch_size), "--lr", "2e-3", "--seed", str(seed), "--out", str(out),
                    "--threads", "1", "--no-progress"),
            logs / f"train-alone-{s.name}.log",
        )  # fmt: skip
        alone[s.name] = out / "model.pt"

    console.rule("[bold]5. Zero-shot macro-AUC on held-out images of every hospital")
    results = _zero_shot_table(workdir, global_model, alone)
    (workdir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    console.print(
        f"\nDone in {time.monotonic() - t_start:.0f} s. Everything is under {workdir} "
        f"(sites/, federation/consortium/, models/, results.json, logs/)."
    )


def _zero_shot_table(workdir: Path, global_model: Path, alone: dict[str, Path]) -> dict:
    import torch

    from vilref_fed.data.folder_dataset import FolderPairDataset
    from vilref_fed.eval.zeroshot import evaluate_zeroshot
    from vilref_fed.model import load_checkpoint
    from vilref_fed.ontology import load_ontology

    torch.set_num_threads(2)
    ontology = load_ontology()
    models = {"federated (global)": global_model, **{f"{k} alone": v for k, v in alone.items()}}
    table = Table(title="Zero-shot macro-AUC on held-out synthetic images (prompts in each site's language)")
    table.add_column("model")
    for s in SITES:
        table.add_column(f"{s.name} ({s.language})", justify="right")
    table.add_column("mean", justify="right")
    results: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        model, _meta = load_checkpoint(path)
        model.eval()
        cfg = model.config
        row: dict[str, float] = {}
        for s in SITES:
            ds = FolderPairDataset(workdir / "heldout" / s.name, cfg.image_size, tuple(cfg.image_mean),
                                   tuple(cfg.image_std))  # fmt: skip
            res = evaluate_zeroshot(model, ds, ontology, lang=s.language)
            row[s.name] = float(res["macro_auc"])
        row["mean"] = sum(row.values()) / len(SITES)
        results[label] = row
        table.add_row(label, *(f"{row[s.name]:.3f}" for s in SITES), f"{row['mean']:.3f}")
    console.print(table)
    return results


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
