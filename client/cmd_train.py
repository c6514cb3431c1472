"""`vilref-client train`: single-site (or centralised) ViLReF pre-training, outside the federation.

Trains on an ingested site (`--site-dir`) or a generated synthetic hospital (`--data`) and writes to
`--out`: model.pt (the exported model: weights, architecture, ontology hash, prompt language),
trainer_checkpoint.pt (exact resume: `--resume`), metrics.json and train.toml (what was run).
Several GPUs in one hospital: launch it under `torchrun --nproc-per-node N`.

Heavy imports happen inside the command so `vilref-client --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from client.common import console, err_console, fail

MODEL_FILE = "model.pt"
RESUME_FILE = "trainer_checkpoint.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train.toml"


def _train_config(config: Path | None, overrides: dict[str, Any]):
    from vilref_fed.train import TrainConfig

    try:
        cfg = TrainConfig.from_toml(config) if config is not None else TrainConfig()
        return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        fail(f"{exc}")


def _datasets(site_dir: Path | None, data: Path | None, model, labels_from: str):
    """(train, val or None, label_ids, prompt language, source description) for the chosen input."""
    cfg = model.config
    size, mean, std = cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std)
    if site_dir is not None:
        from vilref_fed.data.site import SiteError, open_site
        from vilref_fed.data.site_dataset import SiteDataset

        try:
            site = open_site(site_dir)
            language = site.config.language
            site.close()
            train = SiteDataset(site_dir, split="train", image_size=size, mean=mean, std=std)
            val = SiteDataset(site_dir, split="val", image_size=size, mean=mean, std=std)
        except SiteError as exc:
            fail(str(exc))
        return train, (val if len(val) else None), tuple(train.label_ids), language, "site"
    try:
        from vilref_fed.data.folder_dataset import FolderPairDataset
    except ImportError:  # pragma: no cover - the synthetic-data module ships with the package
        fail("synthetic folders are not supported by this installation; use --site-dir")
    if not data.is_dir():
        fail(f"--data {data} is not a directory; generate one with `vilref-client synth`")
    try:
        train = FolderPairDataset(data, size, mean, std, split="train", labels_from=labels_from)
        val = FolderPairDataset(data, size, mean, std, split="val", labels_from=labels_from)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        fail(f"{data} is not a usable synthetic site ({exc})")
    language = "en"
    manifest = data / "manifest.json"
    if manifest.is_file():
        try:
            language = json.loads(manifest.read_text(encoding="utf-8")).get("language", "en") or "en"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return train, (val if len(val) else None), tuple(train.label_ids), language, "synthetic"


def _build(model_name: str, pretrained: bool, init_from: Path | None, resume_file: Path | None):
    import torch

    from vilref_fed.model import build_model, load_checkpoint

    try:
        if resume_file is not None:
            state = torch.load(resume_file, map_location="cpu", weights_only=True)
            return build_model(state["model_config"])  # weights come with the trainer checkpoint
        if init_from is not None:
            return load_checkpoint(init_from)[0]
        return build_model(model_name, pretrained=pretrained)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        fail(f"cannot build the model: {exc}")


def register(app: typer.Typer) -> None:
    """Add `train` to the vilref-client app."""

    @app.command("train")
    def train(
        site_dir: Path | None = typer.Option(
            None, "--site-dir", help="Train on this ingested site directory."
        ),
        data: Path | None = typer.Option(
            None, "--data", help="Train on a synthetic hospital folder (from `vilref-client synth`)."
        ),
        model: str = typer.Option(
            "tiny",
            "--model",
            help="Model config: tiny, small, small-zh, vilref-rn50, vilref-vit-b16 or a JSON file.",
        ),
        config: Path | None = typer.Option(None, "--config", help="train.toml with TrainConfig settings."),
        out: Path = typer.Option(Path("vilref-train"), "--out", "-o", help="Output directory."),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs (overrides the config)."),
        max_steps: int | None = typer.Option(
            None, "--max-steps", min=1, help="Optimiser steps (overrides epochs)."
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=2, help="Pairs per process per step."
        ),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
        objective: str | None = typer.Option(None, "--objective", help="wscl or clip."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
        seed: int | None = typer.Option(None, "--seed", help="Seed for initialisation and data order."),
        pretrained: bool = typer.Option(
            False, "--pretrained", help="Load the config's offline pretrained tower weights."
        ),
        init_from: Path | None = typer.Option(None, "--init", help="Start from an exported model.pt."),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out exactly."),
        force: bool = typer.Option(False, "--force", help="Overwrite a previous run in --out."),
        checkpoint_every: int = typer.Option(
            100, "--checkpoint-every", min=0, help="Steps between checkpoints."
        ),
        labels_from: str = typer.Option(
            "extractor", "--labels-from", help="--data only: extractor (from report text), report or truth."
        ),
        threads: int | None = typer.Option(
            None,
            "--threads",
            min=1,
            help="CPU threads for torch (default: all cores; fewer on a shared host).",
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
        print_config: bool = typer.Option(
            False, "--print-config", help="Print the effective train settings as TOML and exit."
        ),
    ) -> None:
        """Pre-train ViLReF on one site's images and reports (no federation, nothing leaves this machine)."""
        overrides = dict(
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            objective=objective,
            device=device,
            seed=seed,
        )
        tcfg = _train_config(config, overrides)
        if print_config:
            console.print(tcfg.to_toml(), end="", markup=False, highlight=False)
            return
        if (site_dir is None) == (data is None):
            fail("give exactly one of --site-dir (an ingested site) or --data (a synthetic folder)")
        if resume and force:
            fail("--resume and --force contradict each other; pick one")
        if init_from is not None and resume:
            fail("--init starts a new run; --resume continues one: pick one")
        resume_file = out / RESUME_FILE
        if resume and not resume_file.is_file():
            fail(f"nothing to resume: {resume_file} does not exist; start the run without --resume")
        if not resume and not force and ((out / MODEL_FILE).exists() or resume_file.exists()):
            fail(f"{out} already holds a training run; pass --resume to continue it or --force to replace it")
        if labels_from not in ("extractor", "report", "truth"):
            fail("--labels-from must be extractor, report or truth")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        _run(
            site_dir,
            data,
            model,
            tcfg,
            out,
            pretrained,
            init_from,
            resume,
            checkpoint_every,
            labels_from,
            progress,
        )


def _run(
    site_dir,
    data,
    model_name,
    tcfg,
    out: Path,
    pretrained,
    init_from,
    resume,
    checkpoint_every,
    labels_from,
    progress,
) -> None:
    import torch

    from vilref_fed.model import save_checkpoint
    from vilref_fed.ontology import load_ontology
    from vilref_fed.train import LocalTrainer
    from vilref_fed.train import distributed as D

    D.init_from_env(tcfg.device)
    resume_file = out / RESUME_FILE
    torch.manual_seed(tcfg.seed)
    model = _build(model_name, pretrained, init_from, resume_file if resume else None)
    train_ds, val_ds, label_ids, language, source = _datasets(site_dir, data, model, labels_from)
    if len(train_ds) == 0:
        fail("no training pairs: ingest images and their reports first (`vilref-client ingest`)")
    tcfg = tcfg.replace(num_labels=len(label_ids))
    try:
        trainer = LocalTrainer(model, tcfg)
        steps = None
        if resume:
            trainer.load_checkpoint(resume_file)
            steps = trainer.plan_end - trainer.global_step
            if steps <= 0:
                fail(f"the run in {out} already finished ({trainer.global_step} steps); nothing to resume")
        out.mkdir(parents=True, exist_ok=True)
        if D.rank() == 0:
            (out / CONFIG_FILE).write_text(tcfg.to_toml(), encoding="utf-8")
        try:
            metrics = trainer.fit(
                train_ds,
                max_steps=steps,
                progress=progress,
                checkpoint_path=resume_file,
                checkpoint_every=checkpoint_every,
            )
        except KeyboardInterrupt:
            trainer.save_checkpoint(resume_file)
            fail(f"interrupted at step {trainer.global_step}; continue with --resume", code=130)
        val_metrics = trainer.evaluate(val_ds) if val_ds is not None else {}
    except (ValueError, FloatingPointError) as exc:
        fail(str(exc))
    if D.rank() != 0:
        return
    ontology = load_ontology()
    summary = {
        "source": source,
        "model": model.config.name,
        "train_pairs": len(train_ds),
        "val_pairs": len(val_ds) if val_ds is not None else 0,
        "train": metrics,
        "val": val_metrics,
    }
    save_checkpoint(
        out / MODEL_FILE,
        model,
        {
            "ontology_hash": ontology.hash,
            "label_ids": list(label_ids),
            "prompt_language": language,
            "training": {"kind": "local", **summary},
        },
    )
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    err_console.print(
        f"trained {int(metrics['steps'])} steps on {len(train_ds)} pairs: loss {metrics['loss']:.4f}, "
        f"{metrics['samples_per_s']:.1f} samples/s"
        + (f", val R@1 i2t {val_metrics['i2t_r1']:.3f}" if val_metrics else ""),
        highlight=False,
    )
    console.print(f"model: {out / MODEL_FILE}", highlight=False, markup=False)
