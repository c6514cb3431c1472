"""The ground every capability stands on: entry points, import direction, offline env, log redaction."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vilref_fed
from vilref_fed.logs import RedactSensitiveFilter, Sensitive, configure_logging, get_logger
from vilref_fed.offline import OFFLINE_ENV, child_env

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_roles_or_flower():
    offenders = []
    for py in (ROOT / "vilref_fed").rglob("*.py"):
        bad = _imports(py) & {"server", "client", "flwr"}
        if bad:
            offenders.append(f"{py.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_objectives_do_not_import_the_training_loop():
    for py in (ROOT / "vilref_fed" / "objectives").rglob("*.py"):
        src = py.read_text(encoding="utf-8")
        assert "vilref_fed.train" not in src, py


def test_offline_env_is_applied_and_inherited():
    for k, v in OFFLINE_ENV.items():
        assert os.environ[k] == v
    env = child_env({"EXTRA": "1"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0" and env["EXTRA"] == "1"


@pytest.mark.parametrize("app_path", ["client.cli", "server.cli"])
def test_cli_help_and_version(app_path):
    module = __import__(app_path, fromlist=["app"])
    runner = CliRunner()
    res = runner.invoke(module.app, ["--help"])
    assert res.exit_code == 0, res.output
    assert "Commands" in res.output
    res = runner.invoke(module.app, ["--version"])
    assert res.exit_code == 0 and vilref_fed.__version__ in res.output


def test_every_command_has_help():
    """`--help` on every command and group, recursively, exits 0 and prints a description."""
    import click
    import typer.main

    from client.cli import app as client_app
    from server.cli import app as server_app

    runner = CliRunner()
    for typer_app in (client_app, server_app):
        root = typer.main.get_command(typer_app)

        def walk(cmd: click.Command, path: list[str]):
            yield path
            if isinstance(cmd, click.Group):
                for name, sub in cmd.commands.items():
                    yield from walk(sub, path + [name])

        for path in walk(root, []):
            res = runner.invoke(typer_app, path + ["--help"])
            assert res.exit_code == 0, (path, res.output)
            assert "Usage" in res.output, path


def test_console_scripts_run_as_processes():
    bindir = Path(sys.executable).parent
    for script in ("vilref-client", "vilref-server"):
        out = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Usage" in out.stdout


def test_sensitive_values_never_format():
    report = "Moderate NPDR with macular oedema OD. Patient John Smith."
    s = Sensitive(report)
    formatted = [f"{s}", str(s), repr(s), "%s" % (s,), f"{s:>80}"]  # noqa: UP031
    assert all(report not in text for text in formatted)
    assert "redacted" in str(s)
    assert s.value == report


def test_log_file_redacts_sensitive_arguments(tmp_path):
    log_file = tmp_path / "site.log"
    configure_logging(logging.DEBUG, log_file=log_file)
    secret = "PatientName=Zhang^Wei report: 右眼视网膜中央静脉阻塞"
    get_logger("test").info("ingested report %s for %s", Sensitive(secret), Sensitive("PID123456"))
    for h in logging.getLogger("vilref").handlers:
        h.flush()
    data = log_file.read_bytes()
    assert b"ingested report" in data
    assert secret.encode() not in data and b"PID123456" not in data and "静脉".encode() not in data


def test_redaction_filter_on_dict_args():
    rec = logging.LogRecord("vilref", logging.INFO, __file__, 1, "%(a)s", None, None)
    rec.args = {"a": Sensitive("secret text")}
    RedactSensitiveFilter().filter(rec)
    assert "secret text" not in rec.getMessage()
