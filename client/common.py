"""Helpers shared by the `vilref-client` commands: version flag, one-line errors, the console."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

import vilref_fed

console = Console()
err_console = Console(stderr=True)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"vilref-fed {vilref_fed.__version__}")
        raise typer.Exit()


def fail(message: str, code: int = 2) -> NoReturn:
    """A one-line error that says what is wrong and what to do, then a non-zero exit. No traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)
