"""Logging that cannot leak report text or patient identifiers.

Two guards, because discipline alone fails the first time someone adds a debug line:
- `Sensitive` wraps a value (report text, a patient ID, a name) so that formatting it anywhere —
  a log call, an f-string, an exception message — prints only `<redacted N chars>`.
- `configure_logging` installs a filter that redacts any `Sensitive` arguments and drops the
  arguments of records from third-party loggers at DEBUG level, where libraries dump payloads.
Code that handles report text or DICOM identifiers must log counts, hashes and file positions only.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOGGER_NAME = "vilref"


class Sensitive:
    """A value that must never be printed. `.value` gives it back for the code that needs it."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def _redacted(self) -> str:
        try:
            n = len(self.value)  # type: ignore[arg-type]
        except TypeError:
            return "<redacted>"
        return f"<redacted {n} chars>"

    def __str__(self) -> str:
        return self._redacted()

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return self._redacted()


class RedactSensitiveFilter(logging.Filter):
    """Replaces `Sensitive` arguments of a record by their redacted form before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, Sensitive):
            record.msg = str(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(str(a) if isinstance(a, Sensitive) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: (str(v) if isinstance(v, Sensitive) else v) for k, v in record.args.items()}
        return True


def get_logger(name: str | None = None) -> logging.Logger:
    """The toolkit's logger (a child of `vilref`), so one configuration covers every module."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def configure_logging(level: int | str = logging.INFO, log_file: Path | None = None) -> logging.Logger:
    """Rich console logging plus an optional plain log file, both behind the redaction filter."""
    from rich.logging import RichHandler

    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    console.addFilter(RedactSensitiveFilter())
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.addFilter(RedactSensitiveFilter())
        root.addHandler(fh)
    root.propagate = False
    return root
