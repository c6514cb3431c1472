"""The Flower ServerApp (`server.app:app`), run by the SuperLink for each `vilref-server start`.

It reads the consortium directory named in the run config and runs server/training_run.py; the
round loop, checks, checkpoints and database records live there and in server/federation.py.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import vilref_fed  # noqa: F401  (offline environment before anything else is imported)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.training_run import run_training

    run_training(grid, dict(context.run_config), context.run_id)
