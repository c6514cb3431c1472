"""`vilref-client` commands: screen, thresholds, import-chinese-clip.

- `screen` runs the shared model over a fundus export and writes a ranked, de-identified result
  list, a JSON summary and an HTML report (see vilref_fed/eval/screening.py).
- `thresholds` chooses per-label operating points on a validation split (a target sensitivity) and
  stores them in the model file, so every later `screen` uses them.
- `import-chinese-clip` turns the checkpoints released with the ViLReF paper into a model file.
"""

from __future__ import annotations

from pathlib import Path

import typer

from client.common import console, err_console, fail


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    app.command("screen")(screen)
    app.command("thresholds")(thresholds)
    app.command("import-chinese-clip")(import_chinese_clip)


def screen(
    paths: list[Path] = typer.Argument(
        None, help="DICOM/PNG/JPEG files or folders (same as --input).", show_default=False
    ),
    model: Path = typer.Option(
        ..., "--model", "-m", help="Model file (from `vilref-server export` or `import-chinese-clip`)."
    ),
    inputs: list[Path] = typer.Option(
        None, "--input", "-i", help="File or folder to screen; repeat for several.", show_default=False
    ),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (results.csv, summary.json, report.html)."
    ),
    labels: list[str] = typer.Option(
        None,
        "--labels",
        "-l",
        help="Labels to score (comma-separated or repeated); default all.",
        show_default=False,
    ),
    threshold: list[str] = typer.Option(
        None,
        "--threshold",
        "-t",
        help=(
            "Override thresholds: a number for every label, or LABEL=NUMBER (repeatable). "
            "Default: the model's validated operating points, else 0.5."
        ),
        show_default=False,
    ),
    lang: str = typer.Option(None, "--lang", help="Prompt language en|zh (default: the model's)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(
        None, "--workers", help="Decoding worker processes (default: cores - 1, at most 8)."
    ),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    thumbnails: bool = typer.Option(
        False,
        "--thumbnails",
        help="Include thumbnails of the top flagged images in report.html (patient images!).",
    ),
    site_dir: Path = typer.Option(
        None,
        "--site-dir",
        help="Site directory: key study hashes with the site's secret and use its image size.",
    ),
) -> None:
    """Zero-shot screening of a fundus export: a ranked list of abnormal-looking studies, per finding.

    Rejected files are listed in OUTDIR/private/rejected.csv and never stop the run; the command fails
    only when nothing could be screened. Everything outside OUTDIR/private/ is de-identified.
    """
    from vilref_fed.eval.screening import ScreeningError, ScreenOptions, screen_model_file

    all_inputs = [*(paths or []), *(inputs or [])]
    if not all_inputs:
        fail("no input given; pass DICOM/PNG/JPEG files or folders with --input PATH")
    if not model.is_file():
        fail(f"model file {model} does not exist; export one with `vilref-server export` or import one")
    options = ScreenOptions(
        inputs=all_inputs,
        out_dir=out_dir,
        labels=labels or None,
        thresholds=threshold or (),
        lang=lang,
        batch_size=batch_size,
        workers=workers,
        device=device,
        thumbnails=thumbnails,
        site_dir=site_dir,
    )
    try:
        summary = screen_model_file(model, options, console=err_console)
    except ScreeningError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; the results of this run were not written", code=130)
    _print_summary(summary, out_dir)


def _print_summary(summary: dict, out_dir: Path) -> None:
    from rich.table import Table

    c = summary["counts"]
    t = Table(title="Screening", show_header=False)
    t.add_row("images screened", str(c["images_screened"]))
    t.add_row("images flagged", str(c["images_flagged"]))
    t.add_row("studies flagged", f"{c['studies_flagged']} of {c['studies_screened']}")
    t.add_row("files rejected", str(c["files_rejected"]))
    for reason, n in summary["rejected_by_reason"].items():
        t.add_row(f"  {reason}", str(n))
    t.add_row("throughput", f"{summary['images_per_s']:.1f} images/s on {summary['device']}")
    console.print(t)
    if summary["model"].get("ontology_matches") is False:
        console.print(
            "[yellow]warning:[/] the model was trained with another ontology version than this site's; "
            "its prompts come from this site's ontology"
        )
    if c["files_rejected"]:
        console.print(f"rejected files and reasons: {out_dir / 'private' / 'rejected.csv'}")
    console.print(f"results: {out_dir / 'results.csv'}  report: {out_dir / 'report.html'}")


def thresholds(
    model: Path = typer.Option(..., "--model", "-m", help="Model file to calibrate."),
    site_dir: Path = typer.Option(
        None, "--site-dir", help="Site directory: its validation split (labels from reports)."
    ),
    data: Path = typer.Option(
        None, "--data", help="A synthetic hospital folder (images + truth.csv) instead of a site."
    ),
    split: str = typer.Option("val", "--split", help="Which split of the site/folder to calibrate on."),
    target_sensitivity: float = typer.Option(
        0.9, "--target-sensitivity", help="Sensitivity each label's threshold must reach."
    ),
    min_auc: float = typer.Option(
        0.6,
        "--min-auc",
        help="Labels whose validation AUC is below this are not flagged (scores still shown).",
    ),
    lang: str = typer.Option(None, "--lang", help="Prompt language en|zh (default: the model's)."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Write the calibrated model here (default: update --model in place)."
    ),
) -> None:
    """Choose per-label operating points on a validation split and store them in the model file."""
    from vilref_fed.eval.thresholds import ThresholdError, calibrate_model_file

    if (site_dir is None) == (data is None):
        fail("give exactly one of --site-dir (a site's validation split) or --data (a synthetic folder)")
    if not 0.0 < target_sensitivity <= 1.0:
        fail("--target-sensitivity must be in (0, 1], e.g. 0.9")
    try:
        points, path = calibrate_model_file(
            model,
            out or model,
            target_sensitivity,
            site_dir=site_dir,
            data_dir=data,
            split=split,
            lang=lang,
            min_auc=min_auc,
        )
    except ThresholdError as exc:
        fail(str(exc))
    from rich.table import Table

    t = Table(title=f"Operating points (target sensitivity {target_sensitivity:.2f})")
    for col in ("label", "threshold", "sensitivity", "specificity", "AUC", "positives", "flagged"):
        t.add_column(col)
    for p in points.values():
        flagged = "no: AUC too low" if p.auc < min_auc else "yes"
        cells = (f"{p.threshold:.4f}", f"{p.sensitivity:.3f}", f"{p.specificity:.3f}", f"{p.auc:.3f}")
        t.add_row(p.label_id, *cells, str(p.n_positive), flagged)
    console.print(t)
    console.print(f"stored in {path}")


def import_chinese_clip(
    src: Path = typer.Argument(
        ..., help="The released checkpoint (e.g. ViLReF_ViT.pt, Chinese-CLIP format)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the vilref-fed model file."),
    vocab: str = typer.Option(
        "bert-chinese",
        "--vocab",
        help="Tokenizer vocab.txt of the release (21,128 lines); default: the vendored identical copy.",
    ),
    context_length: int = typer.Option(
        100, "--context-length", help="Tokens per prompt (ViLReF trained with 100)."
    ),
    lang: str = typer.Option(
        "zh", "--lang", help="Language of the zero-shot prompts for this model (en|zh)."
    ),
) -> None:
    """Import a ViLReF / Chinese-CLIP checkpoint (ViT-B/16 or RN50) as a vilref-fed model file."""
    if lang not in ("en", "zh"):
        fail("--lang must be en or zh")
    from vilref_fed.model.import_chinese_clip import ChineseClipImportError, import_to_checkpoint

    try:
        path = import_to_checkpoint(
            src, out, context_length=context_length, vocab=vocab, prompt_language=lang
        )
    except ChineseClipImportError as exc:
        fail(str(exc))
    console.print(f"imported {src.name} -> {path}")
