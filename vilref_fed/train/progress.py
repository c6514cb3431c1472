"""The training progress bar: step, loss and throughput, so a site operator sees work advancing."""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress(AbstractContextManager):
    """A rich bar when enabled; a no-op otherwise (other DDP ranks, tests, `progress=False`)."""

    def __init__(
        self, total: int, enabled: bool, description: str = "training", console: Console | None = None
    ):
        self.enabled = enabled and total > 0
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} samples/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, loss="-", rate="-")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def update(self, completed: int, loss: float | None = None, samples_per_s: float | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if samples_per_s is not None:
            fields["rate"] = f"{samples_per_s:.1f}"
        self._progress.update(self._task, completed=completed, **fields)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
