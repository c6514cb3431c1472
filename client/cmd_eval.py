"""`vilref-client` commands: eval zeroshot, eval linear-probe (JSON + self-contained HTML reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from client.common import console, fail


def _open_data(path: Path, split: str, image_size: int, mean, std) -> tuple[Any, str]:
    """A labelled dataset from a synthetic site (truth.csv: image-level truth) or an ingested site
    directory (site.toml: labels extracted from its reports)."""
    from vilref_fed.data.folder_dataset import FolderPairDataset
    from vilref_fed.data.site_dataset import SiteDataset

    if not path.is_dir():
        fail(f"{path} is not a directory; give a synthetic site (vilref-client synth) or a site directory")
    if (path / "truth.csv").is_file():
        ds = FolderPairDataset(path, image_size, tuple(mean), tuple(std), split=split)
        kind = "synthetic truth"
    elif (path / "site.toml").is_file():
        ds = SiteDataset(
            path,
            split="val" if split == "test" else split,
            image_size=image_size,
            mean=tuple(mean),
            std=tuple(std),
        )
        kind = "labels extracted from the site's reports"
    else:
        fail(f"{path} has neither truth.csv (synthetic site) nor site.toml (site directory)")
    if len(ds) == 0:
        fail(f"no labelled images in {path} (split {split}); check the directory or use --split all")
    return ds, kind


def _load_model(path: Path):
    from vilref_fed.model import load_checkpoint

    try:
        return load_checkpoint(path)
    except ValueError as exc:
        fail(f"{exc}; give the .pt file written by `vilref-server export` or `vilref-client train`")


def _check_labels(requested: list[str] | None, ontology) -> list[str] | None:
    if not requested:
        return None
    wanted = [p.strip() for item in requested for p in item.split(",") if p.strip()]
    unknown = [w for w in wanted if w not in ontology.label_ids]
    if unknown:
        fail(f"unknown label(s) {', '.join(unknown)}; labels: {', '.join(ontology.label_ids)}")
    return [x for x in ontology.label_ids if x in wanted]


def _print_summary(result: dict[str, Any], html_path: Path) -> None:
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("label", "n+", "AUC", "AP", "F1", "bal.acc"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for label, p in result["per_label"].items():

        def f(v):
            return "n/a" if v is None or v != v else f"{v:.3f}"

        table.add_row(
            label, str(p["n_positive"]), f(p["auc"]), f(p["ap"]), f(p["f1"]), f(p["balanced_accuracy"])
        )
    console.print(table)
    macro = result.get("macro_auc")
    console.print(
        f"macro AUC {macro:.3f} over {result['n_labels_evaluated']} labels"
        if macro == macro
        else "no label had both positives and negatives: no AUC"
    )
    console.print(f"report: {html_path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    sub = typer.Typer(
        help="Evaluate a model: zero-shot with the ontology's prompts, or a linear probe.",
        no_args_is_help=True,
    )
    app.add_typer(sub, name="eval")

    @sub.command("zeroshot")
    def zeroshot(
        model: Path = typer.Option(..., "--model", help="Model checkpoint (.pt)."),
        data: Path = typer.Option(..., "--data", help="Synthetic site (truth.csv) or site directory."),
        lang: str = typer.Option(None, "--lang", help="Prompt language en|zh (default: the model's)."),
        out: Path = typer.Option(Path("eval-zeroshot"), "-o", "--out", help="Report directory."),
        split: str = typer.Option("all", "--split", help="all | train | val (patient-level split)."),
        scheme: str = typer.Option("anchor", "--scheme", help="anchor (vs normal) | raw similarity."),
        labels: list[str] = typer.Option(None, "--labels", help="Only these labels (comma-separated)."),
        threshold: float = typer.Option(0.5, "--threshold", help="Score threshold for F1/balanced accuracy."),
        min_positives: int = typer.Option(5, "--min-positives", help="Labels with fewer positives: no AUC."),
        batch_size: int = typer.Option(64, "--batch-size"),
    ) -> None:
        """Zero-shot multi-label evaluation: per-label and macro AUC, AP, F1, balanced acc., ROC curves."""
        if split not in ("all", "train", "val", "test"):
            fail(f"--split must be all, train or val, not {split!r}")
        if scheme not in ("anchor", "raw"):
            fail(f"--scheme must be anchor or raw, not {scheme!r}")
        if lang is not None and lang not in ("en", "zh"):
            fail(f"--lang must be en or zh, not {lang!r}")
        if not 0.0 <= threshold <= 1.0:
            fail("--threshold must be between 0 and 1")
        if batch_size < 1:
            fail("--batch-size must be at least 1")
        from vilref_fed.eval.report import write_eval_report
        from vilref_fed.eval.zeroshot import evaluate_zeroshot
        from vilref_fed.ontology import load_ontology

        ontology = load_ontology()
        label_ids = _check_labels(labels, ontology)
        net, meta = _load_model(model)
        lang = lang or meta.get("prompt_language") or "en"
        cfg = net.config
        ds, kind = _open_data(data, split, cfg.image_size, cfg.image_mean, cfg.image_std)
        if meta.get("ontology_hash") and meta["ontology_hash"] != ontology.hash:
            console.print("[yellow]warning:[/] the model was trained with a different ontology version")
        with console.status(f"scoring {len(ds)} images"):
            result = evaluate_zeroshot(
                net,
                ds,
                ontology,
                lang=lang,
                label_ids=label_ids,
                scheme=scheme,
                threshold=threshold,
                min_positives=min_positives,
                batch_size=batch_size,
                return_arrays=True,
            )
        settings = {
            "model": model.name,
            "model_config": cfg.name,
            "data": data.name,
            "split": split,
            "truth": kind,
            "prompt_language": lang,
            "scheme": scheme,
            "threshold": threshold,
        }
        try:
            _, html_path = write_eval_report(
                out, result, title="Zero-shot evaluation", settings=settings, stem="zeroshot"
            )
        except OSError as exc:
            fail(f"cannot write the report to {out}: {exc.strerror or exc}")
        _print_summary(result, html_path)

    @sub.command("linear-probe")
    def linear_probe_cmd(
        model: Path = typer.Option(..., "--model", help="Model checkpoint (.pt)."),
        data: Path = typer.Option(..., "--data", help="Training data: synthetic site or site directory."),
        test: Path = typer.Option(None, "--test", help="Held-out data (default: the val split of --data)."),
        out: Path = typer.Option(Path("eval-linear-probe"), "-o", "--out", help="Report directory."),
        l2: float = typer.Option(1e-2, "--l2", help="L2 penalty of the logistic regressions."),
        labels: list[str] = typer.Option(None, "--labels", help="Only these labels (comma-separated)."),
        threshold: float = typer.Option(0.5, "--threshold"),
        min_positives: int = typer.Option(5, "--min-positives"),
        batch_size: int = typer.Option(64, "--batch-size"),
    ) -> None:
        """Linear probe: logistic regression per label on frozen image features (train on --data)."""
        if l2 <= 0:
            fail("--l2 must be positive")
        if not 0.0 <= threshold <= 1.0:
            fail("--threshold must be between 0 and 1")
        from vilref_fed.eval.probe import linear_probe
        from vilref_fed.eval.report import write_eval_report
        from vilref_fed.ontology import load_ontology

        ontology = load_ontology()
        label_ids = _check_labels(labels, ontology) or list(ontology.label_ids)
        net, _meta = _load_model(model)
        cfg = net.config
        if test is None:
            train_ds, kind = _open_data(data, "train", cfg.image_size, cfg.image_mean, cfg.image_std)
            test_ds, _ = _open_data(data, "val", cfg.image_size, cfg.image_mean, cfg.image_std)
        else:
            train_ds, kind = _open_data(data, "all", cfg.image_size, cfg.image_mean, cfg.image_std)
            test_ds, _ = _open_data(test, "all", cfg.image_size, cfg.image_mean, cfg.image_std)
        with console.status(f"features for {len(train_ds)} + {len(test_ds)} images, fitting"):
            result = linear_probe(
                net,
                train_ds,
                test_ds,
                label_ids,
                l2=l2,
                threshold=threshold,
                min_positives=min_positives,
                batch_size=batch_size,
                return_arrays=True,
            )
        settings = {
            "model": model.name,
            "model_config": cfg.name,
            "train": data.name,
            "test": test.name if test else f"{data.name} (val split)",
            "truth": kind,
            "l2": l2,
        }
        try:
            _, html_path = write_eval_report(
                out, result, title="Linear probe", settings=settings, stem="linear_probe"
            )
        except OSError as exc:
            fail(f"cannot write the report to {out}: {exc.strerror or exc}")
        _print_summary(result, html_path)
