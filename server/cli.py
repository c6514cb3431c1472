"""`vilref-server`: what the consortium coordinator runs. Commands live in server/cmd_*.py.

Heavy imports happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import typer

import vilref_fed  # noqa: F401  (pins the offline environment before anything else is imported)
from server import cmd_consortium, cmd_pki, cmd_run
from server.common import version_callback

app = typer.Typer(
    name="vilref-server",
    help=(
        "Coordinator side of vilref-fed: create the consortium's certificates, register hospitals, "
        "start and watch a federated training run, and export the shared model. "
        "Only model weights and scalar metrics ever reach this server."
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
    """Coordinator side of vilref-fed."""


cmd_consortium.register(app)
cmd_run.register(app)
cmd_pki.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
