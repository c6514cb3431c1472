"""`vilref-client labels`: extract label states from a reports CSV, and count them.

Report text never reaches the console or a log: messages carry file names, line numbers and counts.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from client.common import console, err_console, fail

_PROGRESS_MIN_BYTES = 256 * 1024  # below this the whole file takes well under a second


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    labels = typer.Typer(
        help="Turn diagnostic reports into label states (positive / uncertain / negated) with the "
        "consortium ontology, in English and Chinese.",
        no_args_is_help=True,
    )
    app.add_typer(labels, name="labels")

    @labels.command("extract")
    def extract(
        reports: Path = typer.Argument(..., help="UTF-8 CSV with columns report_id,report (optional eye)."),
        out: Path = typer.Option(..., "-o", "--out", help="JSONL file to write, one object per input row."),
        eye_column: str = typer.Option(
            None,
            "--eye-column",
            help="Column holding the eye of each row (OD/OS/OU, R/L, 右/左); findings of the other eye are "
            "left out. Default: use a column named 'eye' if there is one.",
        ),
        extension: Path = typer.Option(
            None, "--extension", help="Site synonym extension (TOML) to merge into the ontology."
        ),
        progress: bool = typer.Option(
            None, "--progress/--no-progress", help="Show a progress bar (default: for files over 256 KiB)."
        ),
    ) -> None:
        """Extract labels from REPORTS.csv into OUT.jsonl: report_id, positive, uncertain, negated.

        REPORTS is a UTF-8 CSV with a header holding report_id and report (and optionally eye). Each
        input row gives one JSON line, in order; an empty report gives empty lists. Bad input stops
        with a one-line error (exit code 2) and leaves OUT as it was.
        """
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        from vilref_fed.labels import LabelExtractor, get_extractor
        from vilref_fed.labels.batch import ReportsFileError, extract_file
        from vilref_fed.ontology import OntologyError, load_ontology

        try:
            if extension is not None:
                extractor = LabelExtractor(load_ontology(extension=extension))
            else:
                extractor = get_extractor()
        except OntologyError as exc:
            fail(escape(f"ontology extension rejected: {exc}"))
        try:
            size = reports.stat().st_size if reports.is_file() else 0
        except OSError:
            size = 0
        show = progress if progress is not None else size >= _PROGRESS_MIN_BYTES
        try:
            with Progress(
                TextColumn("[bold]labels[/] {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[rows]} reports"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
                disable=not show,
            ) as bar:
                task = bar.add_task(reports.name, total=size or None, rows=0)
                summary = extract_file(
                    reports,
                    out,
                    extractor,
                    eye_column=eye_column or "eye",
                    eye_required=eye_column is not None,
                    progress=lambda pos, rows: bar.update(task, completed=pos, rows=rows),
                )
                bar.update(task, completed=size, rows=summary.rows)
        except ReportsFileError as exc:
            fail(escape(str(exc)))
        console.print(
            f"wrote {summary.rows} rows to {out}: {summary.labelled} with a finding, "
            f"{summary.rows - summary.labelled} unlabelled ({summary.empty_reports} with an empty report) "
            f"in {summary.seconds:.2f} s",
            highlight=False,
            soft_wrap=True,
        )
        if summary.unknown_eye:
            err_console.print(
                f"[yellow]warning:[/] {summary.unknown_eye} rows had an eye value that is not OD/OS/OU; "
                "their whole report was used",
                highlight=False,
                soft_wrap=True,
            )

    @labels.command("stats")
    def stats(
        labels_file: Path = typer.Argument(..., help="JSONL written by `vilref-client labels extract`."),
        as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
    ) -> None:
        """Count reports per label and state (positive / uncertain / negated) in a labels JSONL."""
        import json

        from rich.table import Table

        from vilref_fed.labels.batch import ReportsFileError, label_stats
        from vilref_fed.ontology import load_ontology

        try:
            result = label_stats(labels_file, load_ontology().label_ids)
        except ReportsFileError as exc:
            fail(escape(str(exc)))
        if as_json:
            console.print_json(
                json.dumps(
                    {
                        "reports": result.reports,
                        "unlabelled": result.unlabelled,
                        "labels": {lab: dict(c) for lab, c in result.counts.items()},
                        "unknown_labels": result.unknown_labels,
                    }
                )
            )
            return
        table = Table(
            title=f"{labels_file.name}: {result.reports} reports, {result.unlabelled} unlabelled",
            show_edge=False,
        )
        table.add_column("label")
        for state in ("positive", "uncertain", "negated"):
            table.add_column(state, justify="right")
        for lab, counts in result.counts.items():
            name = f"{lab} [yellow](not in ontology)[/]" if lab in result.unknown_labels else lab
            table.add_row(name, *(str(counts[s]) for s in ("positive", "uncertain", "negated")))
        console.print(table)
