"""`vilref-server export`: a completed round's global weights as the model file hospitals load.

The file is `vilref_fed.model.save_checkpoint`'s format (architecture + weights + metadata), with the
ontology hash and prompt language in its metadata, so `vilref-client screen/eval` can check that the
model matches their ontology before using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.checkpoints import load_round_checkpoint
from server.consortium import Consortium
from server.db import CoordinatorDB


class ExportError(RuntimeError):
    pass


def export_round(
    c: Consortium, out: Path, round_no: int | None = None, run_uid: str | None = None
) -> tuple[Path, dict[str, Any]]:
    from server.global_model import export_model

    db = CoordinatorDB(c.database_url())
    try:
        run = db.run_by_uid(run_uid) if run_uid else db.latest_run()
        if run is None:
            raise ExportError(
                "no run in this consortium yet" if not run_uid else f"no run with uid {run_uid}"
            )
        done = {r.round_no: r for r in db.completed_rounds(run.id)}
        if not done:
            raise ExportError(f"run {run.uid} has no completed round yet")
        n = round_no if round_no is not None else max(done)
        if n not in done:
            raise ExportError(f"round {n} of run {run.uid} is not completed; completed: {sorted(done)}")
        data = load_round_checkpoint(Path(done[n].checkpoint or c.checkpoint_path(n)))
        meta = dict(data["meta"])
        meta.update(
            round=n, run_uid=run.uid, source="vilref-fed federated pre-training", metrics=done[n].metrics
        )
        arrays = {k: t.numpy() for k, t in data["arrays"].items()}
        path = export_model(arrays, meta["model"], Path(out), meta)  # type: ignore[arg-type]
        return path, meta
    finally:
        db.close()
