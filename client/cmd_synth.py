"""`vilref-client` commands: synth (generate a synthetic hospital for demos, tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import typer

from client.common import console, fail


def register(app: typer.Typer) -> None:
    """Add this module's commands to the vilref-client app."""

    @app.command("synth")
    def synth(
        out: Path = typer.Option(
            ..., "--out", help="Directory to write the synthetic site into (empty or new)."
        ),
        n: int = typer.Option(200, "--n", help="Number of fundus images to generate."),
        profile: str = typer.Option(
            "urban-dr",
            "--profile",
            help="Site profile: urban-dr (en), myopia-clinic (zh), glaucoma-center (en), balanced (en), "
            "coarse (en; only findings visible at 32-64 px).",
        ),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same files."),
        dicom: bool = typer.Option(False, "--dicom", help="Also write Ophthalmic Photography DICOM files."),
        image_size: int = typer.Option(
            None, "--image-size", help="Scale the camera so its shorter side has this many pixels (>= 32)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Generate a synthetic hospital: fundus photographs (PNG, optionally OP DICOM), reports, true labels.

        Reports are written in the profile's language from the consortium ontology; reports.csv
        links to the DICOM files by accession number and eye, ready for `vilref-client ingest`.
        """
        import json

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from vilref_fed.data.synth_profiles import PROFILES
        from vilref_fed.data.synthetic import generate_site

        if profile not in PROFILES:
            fail(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
        if n < 1:
            fail("--n must be at least 1")
        if image_size is not None and image_size < 32:
            fail("--image-size must be at least 32 pixels")
        if out.exists() and not out.is_dir():
            fail(f"{out} exists and is not a directory; choose a new or empty directory for --out")
        if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
            fail(f"{out} is not empty and is not a synthetic site; choose a new or empty directory for --out")
        try:
            with Progress(
                TextColumn("[bold]synth[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.0f} img/s"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
                disable=as_json,
            ) as bar:
                task = bar.add_task(profile, total=n, rate=0.0)
                import time

                t0 = time.perf_counter()

                def tick(done: int, total: int) -> None:
                    bar.update(task, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))

                summary = generate_site(
                    out, n=n, profile=profile, seed=seed, dicom=dicom, progress=tick, image_size=image_size
                )
        except OSError as exc:
            fail(f"cannot write to {out}: {exc.strerror or exc}; check the path and free space")
        if as_json:
            console.print_json(json.dumps(summary.to_dict()))
            return
        from rich.table import Table

        table = Table(title=f"{summary.profile} ({summary.language}), seed {summary.seed}", show_edge=False)
        table.add_column("label")
        table.add_column("images", justify="right")
        for label, count in summary.label_counts.items():
            if count:
                table.add_row(label, str(count))
        console.print(table)
        console.print(
            f"wrote {summary.n_images} images, {summary.n_reports} reports, {summary.n_patients} patients"
            f"{' (+ DICOM)' if summary.dicom else ''} to {summary.out_dir} in {summary.seconds:.1f} s"
        )
