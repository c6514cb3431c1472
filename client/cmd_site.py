"""`vilref-client init`, `ingest`, `status` and `quarantine list`: set up a site and fill it.

Heavy imports (pydicom, sqlalchemy models, the label extractor) happen inside the commands, so
`vilref-client --help` stays instant. Errors are one line and a non-zero exit; nothing here prints
report text or patient identifiers (the engine only hands back counts, hashes, files and lines).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

from client.common import console, err_console, fail

SITE_DIR_HELP = "Site directory (created by `vilref-client init`)."
LIST_LIMIT = 20


def _open(site_dir: Path):
    from vilref_fed.data.site import SiteError, open_site

    try:
        return open_site(site_dir)
    except SiteError as exc:
        fail(str(exc))


def _describe(exc: BaseException) -> str:
    """One line about a system or database error. SQLAlchemy's own text quotes the statement's
    parameters (report text, keys), so only the driver's first line is shown."""
    orig = getattr(exc, "orig", None)
    if orig is not None:
        first = (str(orig).strip().splitlines() or [""])[0]
        return f"database error ({type(orig).__name__}: {first[:200]})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return type(exc).__name__


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class _RichProgress:
    """Adapter from the engine's ProgressSink to a rich progress bar (on stderr: stdout stays clean)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.task: Any = None
        self._start = 0.0
        self._done = 0

    def __enter__(self) -> _RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, name: str, total: int | None) -> None:
        import time

        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(name, total=total, rate="")
        self._start, self._done = time.monotonic(), 0

    def advance(self, n: int = 1) -> None:
        import time

        self._done += n
        dt = max(time.monotonic() - self._start, 1e-6)
        self.progress.update(self.task, advance=n, rate=f"{self._done / dt:6.1f}/s")


def _setup_log(site) -> None:
    from vilref_fed.logs import configure_logging

    root = configure_logging(logging.INFO, site.logs_dir / "ingest.log")
    for h in root.handlers:  # the console gets warnings only; the file gets the run's counts
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


def _summary_table(result, site_name: str):
    from rich.table import Table

    run, st = result.run, result.status
    t = Table(title=f"Ingestion summary: {site_name}", title_justify="left")
    t.add_column("item")
    t.add_column("this run", justify="right")
    t.add_column("site total", justify="right")
    t.add_row("files found", str(run.files_found), str(st["files_recorded"]))
    t.add_row("files already ingested", str(run.files_skipped), "")
    t.add_row("accepted", str(run.accepted), str(st["accepted"]))
    t.add_row("duplicates", str(sum(run.duplicates.values())), str(st["duplicates"]))
    reasons = sorted(set(run.quarantined) | set(st["quarantined"]))
    for reason in reasons:
        t.add_row(
            f"quarantined: {reason}",
            str(run.quarantined.get(reason, 0)),
            str(st["quarantined"].get(reason, 0)),
        )
    if not reasons:
        t.add_row("quarantined", "0", "0")
    t.add_row("report rows read", str(run.report_rows), str(st["reports_total"]))
    t.add_row("reports new / updated", f"{run.reports_new} / {run.reports_updated}", "")
    t.add_row("reports linked", "", str(st["reports_linked"]))
    t.add_row("reports without an image", "", str(st["reports_orphan"]))
    t.add_row("images without a report", "", str(st["images_without_report"]))
    kinds = sorted(set(run.report_issues) | set(st["report_issues"]))
    for kind in kinds:
        t.add_row(
            f"report rows skipped: {kind}",
            str(run.report_issues.get(kind, 0)),
            str(st["report_issues"].get(kind, 0)),
        )
    return t


def _labels_table(status: dict[str, Any]):
    from rich.table import Table

    t = Table(title="Label counts (linked images, training vector)", title_justify="left")
    t.add_column("label")
    t.add_column("images", justify="right")
    for label, n in sorted(status["label_counts"].items(), key=lambda kv: -kv[1]):
        t.add_row(label, str(n))
    return t


def _print_problems(problems: dict[str, list[dict[str, Any]]]) -> None:
    def show(title: str, rows: list[dict[str, Any]], fmt) -> None:
        if not rows:
            return
        console.print(f"[bold]{title}[/] ({len(rows)})", highlight=False)
        for r in rows[:LIST_LIMIT]:
            console.print("  " + fmt(r), highlight=False, markup=False)
        if len(rows) > LIST_LIMIT:
            console.print(f"  ... and {len(rows) - LIST_LIMIT} more (`status --json --problems` lists all)")

    show(
        "Report rows skipped",
        problems["report_issues"],
        lambda r: f"{r['file']}:{r['line']}: {r['kind']}: {r['message']}",
    )
    show("Reports without an image", problems["reports_orphan"], lambda r: f"{r['file']}:{r['line']}")
    show(
        "Images without a report",
        problems["images_without_report"],
        lambda r: f"{r['file']}" + (f" (frame {r['frame']})" if r["frame"] else ""),
    )


def init(
    site_dir: Path = typer.Option(..., "--site-dir", help="Directory to create the site in."),
    name: str = typer.Option(..., "--name", help="Site name shown to the coordinator (not patient data)."),
    language: str = typer.Option("en", "--language", help="Report language: en or zh."),
    database_url: str = typer.Option(
        "",
        "--database-url",
        help="SQLAlchemy URL of a PostgreSQL database (default: SQLite site.db in the site).",
    ),
    image_size: int = typer.Option(
        256, "--image-size", help="Side of the stored canonical images, in pixels."
    ),
) -> None:
    """Create a site directory: site.toml with documented defaults, a secret key, the database."""
    from vilref_fed.data.site import SiteError, init_site

    try:
        site = init_site(site_dir, name, language=language, database_url=database_url, image_size=image_size)
    except SiteError as exc:
        fail(str(exc))
    site.close()
    console.print(f"Created site [bold]{site.config.name}[/] in {site.root}", highlight=False)
    console.print(
        f"  settings: {site.root / 'site.toml'}\n  secret:   {site.root / site.config.secret_file} "
        "(back it up with the database; never share it)",
        highlight=False,
        markup=False,
    )


def ingest(
    site_dir: Path = typer.Option(..., "--site-dir", help=SITE_DIR_HELP),
    dicom: list[Path] = typer.Option(
        None, "--dicom", help="DICOM file or folder (walked recursively). Repeat, or list several after it."
    ),
    more: list[Path] = typer.Argument(None, metavar="[PATH]...", help="More DICOM files or folders."),
    reports: list[Path] = typer.Option(None, "--reports", help="Report CSV file. Repeat for several."),
    link: str = typer.Option(
        None, "--link", help="Link reports by 'accession' or 'study' (default: site.toml)."
    ),
    encoding: str = typer.Option(
        None, "--encoding", help="Encoding of the report CSVs, e.g. utf-8, gb18030 (default: site.toml)."
    ),
    workers: int = typer.Option(None, "--workers", min=1, help="Decoding processes (default: site.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run and site summary as JSON."),
    commit_every: int = typer.Option(32, "--commit-every", min=1, hidden=True, help="Files per transaction."),
) -> None:
    """Ingest DICOM exports and report CSVs into the site: idempotent, resumable, de-identified.

    Several DICOM paths may follow one --dicom (`--dicom A B C`). Run it again after an interruption:
    finished files are skipped and nothing is counted twice.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from vilref_fed.data.ingest import IngestError, IngestOptions, list_problems
    from vilref_fed.data.ingest import ingest as run_ingest

    site = _open(site_dir)
    _setup_log(site)
    options = IngestOptions(
        dicom=[*(dicom or []), *(more or [])],
        reports=list(reports or []),
        link_by=link,
        encoding=encoding,
        workers=workers,
        commit_every=commit_every,
    )
    try:
        with _RichProgress() as progress:
            result = run_ingest(site, options, progress=progress)
    except IngestError as exc:
        fail(str(exc))
    except (OSError, SQLAlchemyError) as exc:
        fail(f"ingestion stopped: {_describe(exc)}; what was committed is kept, run the same command again")
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted[/]: everything committed so far is kept; run the same command to finish."
        )
        raise typer.Exit(130) from None
    problems = list_problems(site)
    site.close()
    if as_json:
        _print_json({"run": result.run.to_dict(), "site": result.status, "problems": problems})
        return
    console.print(_summary_table(result, site.config.name))
    if result.status["label_counts"]:
        console.print(_labels_table(result.status))
    _print_problems(problems)


def status(
    site_dir: Path = typer.Option(..., "--site-dir", help=SITE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    problems: bool = typer.Option(
        False, "--problems", help="Also list skipped rows, orphan reports and images."
    ),
) -> None:
    """Summary of the site's dataset: accepted, quarantined by reason, duplicates, report links."""
    from vilref_fed.data.ingest import list_problems, site_status

    site = _open(site_dir)
    st = site_status(site)
    listed = list_problems(site) if problems else None
    site.close()
    if as_json:
        _print_json({**st, "problems": listed} if listed is not None else st)
        return
    from rich.table import Table

    t = Table(title=f"Site {site.config.name}", title_justify="left")
    t.add_column("item")
    t.add_column("count", justify="right")
    t.add_row("accepted", str(st["accepted"]))
    for reason, n in st["quarantined"].items():
        t.add_row(f"quarantined: {reason}", str(n))
    t.add_row("duplicates", str(st["duplicates"]))
    t.add_row("reports linked", str(st["reports_linked"]))
    t.add_row("reports without an image", str(st["reports_orphan"]))
    t.add_row("images without a report", str(st["images_without_report"]))
    for kind, n in st["report_issues"].items():
        t.add_row(f"report rows skipped: {kind}", str(n))
    t.add_row("patients", str(st["patients"]))
    t.add_row("train / val images", f"{st['split_images']['train']} / {st['split_images']['val']}")
    console.print(t)
    if st["label_counts"]:
        console.print(_labels_table(st))
    if listed is not None:
        _print_problems(listed)


quarantine_app = typer.Typer(help="Files refused by ingestion, with the reason.", no_args_is_help=True)


@quarantine_app.command("list")
def quarantine_list(
    site_dir: Path = typer.Option(..., "--site-dir", help=SITE_DIR_HELP),
    reason: str = typer.Option(None, "--reason", help="Only this reason (e.g. truncated)."),
    as_json: bool = typer.Option(False, "--json", help='Print [{"path", "reason", "message"}] as JSON.'),
) -> None:
    """List rejected files: path, reason category and what is wrong."""
    from vilref_fed.data.dicom import REJECTION_REASONS
    from vilref_fed.data.ingest import quarantine_list as listing

    if reason is not None and reason not in REJECTION_REASONS:
        fail(f"unknown reason {reason!r}; one of: {', '.join(REJECTION_REASONS)}")
    site = _open(site_dir)
    rows = listing(site, reason)
    site.close()
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"Quarantine ({len(rows)} files)", title_justify="left")
    t.add_column("path", overflow="fold")
    t.add_column("reason")
    t.add_column("message", overflow="fold")
    from rich.text import Text

    for r in rows:  # Text(): paths and messages are data, never rich markup
        t.add_row(Text(r["path"]), r["reason"], Text(r["message"]))
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""
    app.command("init")(init)
    app.command("ingest")(ingest)
    app.command("status")(status)
    app.add_typer(quarantine_app, name="quarantine")
