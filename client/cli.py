"""`vilref-client`: what hospital IT runs. Each command group lives in its own module under client/.

Heavy imports (torch, transformers, pydicom) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import typer

import vilref_fed  # noqa: F401  (pins the offline environment before anything else is imported)
from client import (
    cmd_eval,
    cmd_join,
    cmd_keys,
    cmd_labels,
    cmd_privacy,
    cmd_screen,
    cmd_site,
    cmd_synth,
    cmd_train,
)
from client.common import version_callback

app = typer.Typer(
    name="vilref-client",
    help=(
        "Hospital side of vilref-fed: set up a site, ingest fundus DICOM exports and reports, "
        "extract labels, join the consortium's training, and screen images with the shared model. "
        "Images, reports and labels never leave this machine."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Hospital side of vilref-fed."""


for _module in (
    cmd_site, cmd_labels, cmd_synth, cmd_train, cmd_eval, cmd_join, cmd_screen, cmd_privacy, cmd_keys
):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
