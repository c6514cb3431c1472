"""`vilref-client train-head`: a supervised multi-label head on the site's extracted labels, with or
without patient-level differential privacy (Opacus DP-SGD).

This is the objective on which a patient-level epsilon is a true statement (the per-patient loss depends
on that patient only); contrastive pre-training gets site-level DP in federation instead
(docs/privacy.md). Heavy imports happen inside the command so `--help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from client.common import console, err_console, fail


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def _load_model(checkpoint: Path | None, model_name: str | None):
    from vilref_fed.model import build_model, load_checkpoint

    if checkpoint is not None and model_name is not None:
        fail("give either --checkpoint or --model, not both")
    if checkpoint is not None:
        if not checkpoint.is_file():
            fail(f"{checkpoint} does not exist; export the global model with `vilref-server export` first")
        try:
            model, _meta = load_checkpoint(checkpoint)
        except Exception as exc:  # a corrupt or foreign file: one line, no traceback
            fail(f"{checkpoint} is not a vilref-fed model checkpoint ({type(exc).__name__}: {exc})")
        return model, str(checkpoint)
    if model_name is not None:
        try:
            return build_model(model_name), None
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    fail("say which image encoder to put the head on: --checkpoint model.pt (the exported global model)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""

    @app.command("train-head")
    def train_head_cmd(
        site_dir: Path = typer.Option(
            ..., "--site-dir", help="Site directory (created by `vilref-client init`)."
        ),
        checkpoint: Path = typer.Option(
            None, "--checkpoint", help="Global model checkpoint (`vilref-server export`): its image tower."
        ),
        model_name: str = typer.Option(
            None, "--model", help="A model config name with random weights instead of a checkpoint (testing)."
        ),
        mode: str = typer.Option(
            "frozen", "--mode",
            help="frozen: linear probe on fixed features; finetune: also train the image tower "
            "(needs a GroupNorm tower under DP).",
        ),
        feature: str = typer.Option("backbone", "--feature", help="backbone (pre-projection) or embedding."),
        epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over the site's patients."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Expected patients per step."),
        lr: float = typer.Option(
            None, "--lr", help="Learning rate (default 0.5 with frozen SGD, 1e-3 with finetune Adam)."
        ),
        max_images: int = typer.Option(
            8, "--max-images-per-patient", min=1,
            help="Cap on one patient's images per example (bounds their influence).",
        ),
        dp: bool = typer.Option(
            False, "--dp", help="Patient-level DP-SGD (Opacus): clip each patient's gradient, add noise."
        ),
        epsilon: float = typer.Option(
            None, "--epsilon", help="Target epsilon for the whole training (with --dp)."
        ),
        delta: float = typer.Option(
            None, "--delta", help="delta (default: min(1e-5, 1/(10 n^1.1)) for n patients)."
        ),
        noise_multiplier: float = typer.Option(
            None, "--noise-multiplier", help="Noise multiplier instead of a target epsilon (with --dp)."
        ),
        max_grad_norm: float = typer.Option(
            0.1, "--max-grad-norm", help="Per-patient gradient clipping norm C (the head's are ~0.1)."
        ),
        accountant: str = typer.Option("rdp", "--accountant", help="rdp or prv."),
        output: Path = typer.Option(
            None, "-o", "--output", help="Where to write the head (default: SITE/heads/head-<mode>[-dp].pt)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
        seed: int = typer.Option(
            0, "--seed", help="Seed for initialisation and shuffling (never for the DP noise)."
        ),
    ) -> None:
        """Train a multi-label head on the site's labelled images; with --dp, report epsilon per patient."""
        from vilref_fed.data.site import SiteError, open_site
        from vilref_fed.train.privacy import DPSGDConfig, PrivacyBudgetExhausted, PrivacyGuardError

        dp_options = [x is not None for x in (epsilon, noise_multiplier, delta)]
        if not dp and any(dp_options):
            fail("--epsilon, --delta and --noise-multiplier only apply with --dp")
        if dp and (epsilon is None) == (noise_multiplier is None):
            fail("with --dp give exactly one of --epsilon E or --noise-multiplier SIGMA")
        try:
            site = open_site(site_dir)
        except SiteError as exc:
            fail(str(exc))
        site.close()

        import torch

        from vilref_fed.data.site_dataset import SiteDataset
        from vilref_fed.train.head import HeadConfig, evaluate_head, save_head, train_head

        model, base = _load_model(checkpoint, model_name)
        dp_cfg = None
        if dp:
            dp_cfg = DPSGDConfig(epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier,
                                 max_grad_norm=max_grad_norm, epochs=epochs, accountant=accountant)
        cfg = HeadConfig(mode=mode, feature=feature, epochs=epochs, batch_size=batch_size, lr=lr,
                         max_images_per_patient=max_images, seed=seed, dp=dp_cfg)
        try:
            cfg.validate()
        except ValueError as exc:
            fail(str(exc))
        mc = model.config
        try:
            norm = dict(image_size=mc.image_size, mean=tuple(mc.image_mean), std=tuple(mc.image_std))
            train_set = SiteDataset(site_dir, split="train", **norm)
            val_set = SiteDataset(site_dir, split="val", **norm)
        except (SiteError, ValueError) as exc:
            fail(str(exc))
        labelled = int((train_set.labels.sum(axis=1) > 0).sum()) if len(train_set) else 0
        if labelled == 0:
            fail(f"{site_dir} has no labelled training images; ingest reports and run label extraction first")
        torch.manual_seed(seed)
        tasks: dict[str, int] = {}
        with _progress_bar() as bar:
            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            try:
                result = train_head(model, train_set, cfg, num_labels=len(train_set.label_ids),
                                    progress=progress)
            except (PrivacyGuardError, PrivacyBudgetExhausted, ValueError) as exc:
                fail(str(exc))
        metrics = dict(result.metrics)
        metrics["val_images"] = float(len(val_set))
        if len(val_set):
            auc = evaluate_head(model, result.head, val_set, cfg, train_set.label_ids,
                                result.encoder if mode == "finetune" else None)
            if auc["macro_auc"] == auc["macro_auc"]:  # not NaN: some label has both classes
                metrics["val_macro_auc"] = float(auc["macro_auc"])
        out = output or (Path(site_dir) / "heads" / f"head-{mode}{'-dp' if dp else ''}.pt")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_head(out, result, cfg, train_set.label_ids, model_config=mc.to_dict(), base_checkpoint=base)
        if as_json:
            sys.stdout.write(json.dumps({"output": str(out), "privacy_unit": result.unit, **metrics}) + "\n")
            return
        console.print(f"head written to [bold]{out}[/]")
        console.print(f"train loss {metrics['train_loss']:.4f} over {int(metrics['units'])} {result.unit}s "
                      f"({int(metrics['images'])} images), {int(metrics['steps'])} steps")
        if "val_macro_auc" in metrics:
            console.print(f"validation macro AUC {metrics['val_macro_auc']:.3f} on {len(val_set)} images "
                          "(the validation split is small on a small site: read it with care)")
        if dp:
            eps_path = ", ".join(f"{h['epsilon']:.2f}" for h in result.history)
            console.print(f"epsilon after each epoch: {eps_path}")
            console.print(
                f"patient-level DP: epsilon = {metrics['epsilon']:.3f} at delta = {metrics['delta']:.2g} "
                f"(noise multiplier {metrics['noise_multiplier']:.3f}, clip {metrics['max_grad_norm']:g}, "
                f"sample rate {metrics['sample_rate']:.3g}); the unit protected is one {result.unit}"
            )
        else:
            console.print("no differential privacy (add --dp --epsilon E for a patient-level guarantee)")
