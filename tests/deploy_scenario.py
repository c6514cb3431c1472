"""What the deployment tests share: readers for the systemd units, environment files and runbook, and
the one federation scenario that both tests/test_deploy_units_e2e.py and tests/test_key_ceremony.py
assert on (one federation costs tens of seconds on 2 cores, so it runs once per pytest process).

The scenario does what the two IT teams do, with the commands of docs/runbook.md and the ExecStart
lines of deploy/systemd/*.service, on loopback:

1. coordinator: the runbook's `vilref-server init` (loopback host, a free port, the tiny model, one
   round); hospitals site-a and site-b: `vilref-client init` and `ingest` (synthetic OP DICOM);
2. key ceremony: each hospital `keys create`, only node_key.pub is copied to the coordinator, which
   runs `add-site`; ca.crt goes back and `keys show --ca` is run;
3. run 1: the coordinator unit's ExecStart, then each hospital unit's ExecStart, all as real
   processes with the units' environment (EnvironmentFile values pointing into temporary
   directories) — until the coordinator exits after its round; `status` and `export`;
4. the hospitals' services are stopped the way systemd stops them (SIGTERM to the main process);
   the coordinator revokes site-b (`remove-site`); site-a rotates its key (`keys rotate`, then the
   coordinator's `pki replace-site-key`);
5. run 2: the same ExecStart lines again; site-b (revoked) and a copy of site-a holding its retired
   key try to join and are refused; site-a with its new key completes the round alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "deploy" / "systemd"
CONTAINER_DIR = REPO / "deploy" / "container"
RUNBOOK = REPO / "docs" / "runbook.md"
PKI_README = REPO / "deploy" / "pki" / "README.md"
COORDINATOR_UNIT = SYSTEMD_DIR / "vilref-coordinator.service"
SITE_UNIT = SYSTEMD_DIR / "vilref-site.service"
UNITS = (COORDINATOR_UNIT, SITE_UNIT)
INSTALL_BIN = "/opt/vilref-fed/venv/bin"
PROGRAMS = ("vilref-server", "vilref-client")
RUNBOOK_SITE = "st-mary"  # the example hospital name used throughout the runbook

# What systemd gives a service before Environment=/EnvironmentFile= (systemd.exec(5), "Environment
# variables in spawned processes"), for a service account whose home is its state directory.
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Harness-only additions: 2 shared cores (what CPUQuota= would do on a real host), and the
# federation helper's exit-with-parent watch so nothing outlives a killed pytest.
HARNESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VILREF_PARENT_PID": str(os.getpid())}

REFUSED_TEXT = "the coordinator refused this node"


# ----------------------------------------------------------------------------------- systemd units
@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str:
        vals = self.values(section, key)
        assert len(vals) == 1, f"{self.path.name}: expected one {section}.{key}, found {vals}"
        return vals[0]

    def keys(self, section: str) -> set[str]:
        return {k for k, _ in self.sections.get(section, [])}


def parse_unit(path: Path) -> Unit:
    """systemd.syntax(7): sections, Key=Value (keys may repeat), comments, backslash continuation."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path}: assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a Key=Value line: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return Unit(path, sections)


def parse_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= (KEY=value lines, # comments, optional quotes), as systemd reads it."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}: bad line {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def unit_environment(unit: Unit) -> dict[str, str]:
    """The Environment= assignments of a unit (each line may hold several, shell-quoted)."""
    out: dict[str, str] = {}
    for value in unit.values("Service", "Environment"):
        for word in shlex.split(value):
            k, sep, v = word.partition("=")
            assert sep, f"{unit.path.name}: Environment={value!r}"
            out[k] = v
    return out


def env_file_for(unit: Unit) -> Path:
    """The repository's example of the unit's EnvironmentFile= (same file name)."""
    return SYSTEMD_DIR / Path(unit.value("Service", "EnvironmentFile").lstrip("-")).name


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _substitute(word: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise KeyError(f"${name} is used but not set (EnvironmentFile/Environment or the test's values)")
        return env[name]

    return _VAR.sub(one, word)


def exec_start_argv(unit: Unit, env: dict[str, str]) -> list[str]:
    """ExecStart= split and expanded like systemd.service(5): quoted words, `${VAR}` substituted in
    place, a lone `$VAR` word split on whitespace. No command prefixes (`-`, `@`, `+`, ...)."""
    line = unit.value("Service", "ExecStart")
    assert line[0] == "/", f"{unit.path.name}: ExecStart must start with an absolute path: {line!r}"
    argv: list[str] = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        argv.extend(_substitute(word, env).split() if m else [_substitute(word, env)])
    return argv


def local_bin() -> Path:
    """This checkout's console scripts (the test's stand-in for /opt/vilref-fed/venv/bin)."""
    return Path(sys.executable).parent


def to_local(argv: list[str]) -> list[str]:
    """The install prefix of the units replaced by this virtualenv's bin directory."""
    exe = argv[0]
    assert exe.startswith(INSTALL_BIN + "/"), f"{exe} is not under {INSTALL_BIN}"
    return [str(local_bin() / exe[len(INSTALL_BIN) + 1 :]), *argv[1:]]


def service_environment(unit: Unit, env_file_values: dict[str, str], home: Path) -> dict[str, str]:
    """What systemd would give the service: its defaults, Environment=, then EnvironmentFile=
    (which takes precedence, systemd.exec(5)), plus the harness-only values above."""
    env = {"PATH": SYSTEMD_DEFAULT_PATH, "HOME": str(home), "LANG": "C.UTF-8", "USER": "vilref"}
    env["LOGNAME"] = "vilref"
    env.update(unit_environment(unit))
    env.update(env_file_values)
    env.update(HARNESS_ENV)
    return env


# ------------------------------------------------------------------------------------- the runbook
def sh_blocks(path: Path) -> list[str]:
    """The ```sh fenced blocks of a Markdown file."""
    return re.findall(r"^```sh\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def vilref_commands(text: str) -> list[list[str]]:
    """Every `vilref-server ...` / `vilref-client ...` command of a shell text, split into words."""
    out: list[list[str]] = []
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        for i, w in enumerate(words):
            if w in PROGRAMS:
                cmd = []
                for x in words[i:]:
                    if x in ("|", "||", "&&", ";", ">", ">>", "2>&1"):
                        break
                    cmd.append(x)
                out.append(cmd)
                break
    return out


def runbook_commands(path: Path = RUNBOOK) -> list[list[str]]:
    return [c for block in sh_blocks(path) for c in vilref_commands(block)]


def find_command(commands: list[list[str]], *prefix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The one command that starts with `prefix` and holds none of `exclude` (the runbook quotes
    each command once)."""
    found = [c for c in commands if tuple(c[: len(prefix)]) == prefix and not set(exclude) & set(c)]
    assert len(found) == 1, f"expected one `{' '.join(prefix)}` command in the runbook, found {found}"
    return list(found[0])


def fill(argv: list[str], variables: dict[str, str], site: str | None = None) -> list[str]:
    """Shell variables expanded; the runbook's example hospital name replaced by `site`."""
    out = [_substitute(w, variables) for w in argv]
    if site is not None:
        out = [w.replace(RUNBOOK_SITE, site) for w in out]
    return out


def with_options(argv: list[str], **options: str | None) -> list[str]:
    """Set (replace or append) option values; None removes the option. Keys name the options
    (local_steps -> --local-steps, o -> -o). Only for options that take one value."""
    out = list(argv)
    for name, value in options.items():
        flag = "-" + name if len(name) == 1 else "--" + name.replace("_", "-")
        if flag in out:
            i = out.index(flag)
            del out[i : i + 2]
            if value is not None:
                out[i:i] = [flag, value]
        elif value is not None:
            out += [flag, value]
    return out


# --------------------------------------------------------------------------------------- the CLI
def cli_app(program: str) -> Any:
    if program == "vilref-server":
        from server.cli import app
    elif program == "vilref-client":
        from client.cli import app
    else:  # pragma: no cover - guarded by callers
        raise ValueError(program)
    return app


def parse_only(argv: list[str]) -> Any:
    """Parse a command line against the real CLI without running it; raises click.UsageError."""
    import click
    import typer

    cmd = typer.main.get_command(cli_app(argv[0]))
    ctx = cmd.make_context(argv[0], list(argv[1:]))
    while isinstance(cmd, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, sub_args = cmd.resolve_command(ctx, rest)
        assert sub is not None, argv
        ctx = sub.make_context(name, sub_args, parent=ctx)
        cmd = sub
    return ctx


@dataclass
class CliResult:
    argv: list[str]
    exit_code: int
    output: str

    @property
    def flat(self) -> str:
        """Output with line wrapping undone (rich wraps at the terminal width)."""
        return " ".join(self.output.split())


def run_cli(argv: list[str], cwd: Path | None = None) -> CliResult:
    """Run one CLI command in this process (same command objects as the console scripts)."""
    from typer.testing import CliRunner

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli_app(argv[0]), argv[1:], catch_exceptions=False)
    finally:
        os.chdir(old)
    return CliResult(argv, res.exit_code, res.output)


def check(res: CliResult) -> CliResult:
    assert res.exit_code == 0, f"{' '.join(res.argv)} exited {res.exit_code}:\n{res.output}"
    return res


FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


# ------------------------------------------------------------------------------------- processes
@dataclass
class Service:
    """One unit's main process, started with the unit's argv and environment."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: Any = None
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)

    def start(self) -> Service:
        from server.processes import ManagedProcess

        self.proc = ManagedProcess(self.name, to_local(self.argv), self.log, env=self.env).start()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def observe(self) -> None:
        """Record cmdline and environment of every live process of this service (for offline checks)."""
        from server.processes import descendants

        if not self.alive():
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            if pid in self.seen:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            self.seen[pid] = {
                "cmdline": [c.decode(errors="replace") for c in cmd if c],
                "env": dict(e.decode(errors="replace").partition("=")[::2] for e in env if b"=" in e),
            }

    def systemctl_stop(self, timeout: float = 90.0) -> dict[str, Any]:
        """What `systemctl stop` does with KillMode=mixed: SIGTERM to the main process only, wait
        (TimeoutStopSec), then kill whatever is left. Returns the main process's exit code and the
        processes of the service still alive 10 s after the main process exited (should be none)."""
        from server.processes import _alive, descendants

        assert self.proc is not None and self.proc.proc is not None
        tree = [self.proc.pid, *descendants(self.proc.pid)]
        if self.proc.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.proc.wait(timeout=timeout)
            deadline = time.monotonic() + 10
            while any(_alive(p) for p in tree[1:]) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [p for p in tree[1:] if _alive(p)]
        finally:
            self.proc.stop(timeout=5)
        return {"rc": int(code), "left": left, "tree": len(tree)}

    def wait(self, timeout: float) -> int:
        assert self.proc is not None and self.proc.proc is not None
        try:
            return int(self.proc.proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            tail = self.proc.log_tail(30)
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s:\n{tail}") from None

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stop(timeout=5)


def wait_for(predicate: Any, timeout: float, what: str, services: list[Service] = (), interval=0.5) -> None:
    """Poll until `predicate()`; fail at once if one of `services` exits, or after `timeout`."""
    deadline = time.monotonic() + timeout

    def tails() -> str:
        return "\n".join(f"--- {s.name}:\n{s.proc.log_tail(20) if s.proc else ''}" for s in services)

    while not predicate():
        for s in services:
            s.observe()
            if not s.alive() and not predicate():
                raise AssertionError(f"{s.name} exited ({s.proc.returncode()}) before {what}\n{tails()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails()}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------- the scenario
TRAIN = {"batch_size": 8, "queue_size": 32, "warmup_steps": 0}
SITES_TIMEOUTS = {
    "wait_for_sites_s": 240.0,
    "round_timeout_s": 400.0,
    "straggler_grace_s": 300.0,
    "poll_interval_s": 0.3,
}
RUN_TIMEOUT_S = 480.0

_CACHE: dict[str, Any] = {}


def scenario(tmp_path_factory: Any) -> dict[str, Any]:
    """Run the scenario once per pytest process (both test modules share it)."""
    if "result" not in _CACHE:
        if "error" in _CACHE:
            raise AssertionError(f"the deployment scenario failed earlier: {_CACHE['error']}")
        try:
            _CACHE["result"] = _run(tmp_path_factory.mktemp("deploy"))
        except BaseException as err:
            _CACHE["error"] = f"{type(err).__name__}: {err}"
            raise
    return _CACHE["result"]


def _make_synthetic_export(root: Path, profile: str, seed: int) -> Path:
    from vilref_fed.data.synthetic import generate_site

    out = root / f"export-{seed}"
    generate_site(out, 12, profile, seed=seed, dicom=True)
    return out


def _submissions(consortium: Path) -> int:
    """How many times the coordinator has registered the sites and submitted a run to Flower."""
    from server.db import CoordinatorDB

    if not (consortium / "coordinator.db").exists():
        return 0
    db = CoordinatorDB(str(consortium / "coordinator.db"))
    try:
        return sum(1 for e in db.events(None, 500) if e.kind == "submitted")
    finally:
        db.close()


def _round_completed(consortium: Path, round_no: int) -> bool:
    st = _status(consortium)
    return any(r["round"] == round_no and r["status"] == "completed" for r in st["rounds"])


def _status(consortium: Path, run_uid: str | None = None) -> dict[str, Any]:
    from server.db import CoordinatorDB
    from server.live import status_dict

    db = CoordinatorDB(str(consortium / "coordinator.db"))
    try:
        return status_dict(db, run_uid)
    finally:
        db.close()


def _run(root: Path) -> dict[str, Any]:
    from server.processes import free_port
    from server.run_config import load_run_config, save_run_config

    t_start = time.monotonic()
    timeline: list[tuple[str, float]] = []

    def mark(label: str) -> None:
        timeline.append((label, round(time.monotonic() - t_start, 1)))

    r: dict[str, Any] = {"root": root, "cli": {}, "timeline": timeline}
    cmds = runbook_commands()

    def rb(prefix: str, variables: dict[str, str], site: str | None = None) -> list[str]:
        """The runbook's command starting with `prefix`, its variables filled in."""
        return fill(find_command(cmds, *prefix.split(), exclude=("--renew-server-cert",)), variables, site)

    coord_unit, site_unit = parse_unit(COORDINATOR_UNIT), parse_unit(SITE_UNIT)
    port = free_port()
    consortium = root / "var-lib" / "consortium"
    inbox = root / "coordinator-inbox"  # where the coordinator saves what hospitals send
    inbox.mkdir(parents=True)
    coord_vars = {**parse_env_file(env_file_for(coord_unit)), "VILREF_CONSORTIUM_DIR": str(consortium)}
    names = ("site-a", "site-b")
    site_vars: dict[str, dict[str, str]] = {}
    for name in names:
        site_vars[name] = {
            **parse_env_file(env_file_for(site_unit)),
            "VILREF_SITE_DIR": str(root / "var-lib" / name),
            "VILREF_SERVER": f"127.0.0.1:{port}",
            "VILREF_CA_CERT": str(root / "etc" / name / "consortium-ca.crt"),
        }
    r.update(consortium=consortium, port=port, site_vars=site_vars, coord_vars=coord_vars)

    # 1. The coordinator creates the consortium (runbook B2), tuned for a 2-core CI machine: the
    #    tiny model, one local step, two rounds (the second one is interrupted on purpose).
    init = with_options(
        rb("vilref-server init", coord_vars),
        host="127.0.0.1", port=str(port), model="tiny", rounds="2", local_steps="1", min_sites="1",
    )  # fmt: skip
    r["cli"]["init"] = check(run_cli(init))
    cfg = load_run_config(consortium / "run.toml")
    cfg.train.update(TRAIN)
    for k, v in SITES_TIMEOUTS.items():
        setattr(cfg.sites, k, v)
    cfg.run.eval_every = 0
    cfg.server.host = "127.0.0.1"
    save_run_config(cfg, consortium / "run.toml")
    r["cli"]["pki_show"] = check(run_cli(rb("vilref-server pki show", coord_vars)))

    # 2. Hospitals set up their sites (runbook A5) and hold the key ceremony (A6, B3).
    r["fingerprints"] = {}
    for i, name in enumerate(names):
        v = site_vars[name]
        export = _make_synthetic_export(root, ("urban-dr", "glaucoma-center")[i], seed=i + 1)
        check(run_cli(with_options(rb("vilref-client init", v, name), image_size="48")))
        ingest = with_options(
            rb("vilref-client ingest", v, name),
            dicom=str(export / "dicom"),
            reports=str(export / "reports.csv"),
        )
        check(run_cli(ingest))
        created = check(run_cli(rb("vilref-client keys create", v, name)))
        hospital_fp = FINGERPRINT.findall(created.flat)
        # Only the public half travels: the hospital sends keys/node_key.pub, saved as NAME.pub.
        shutil.copyfile(Path(v["VILREF_SITE_DIR"]) / "keys" / "node_key.pub", inbox / f"{name}.pub")
        added = check(run_cli(rb("vilref-server add-site", coord_vars, name), cwd=inbox))
        coordinator_fp = FINGERPRINT.findall(added.flat)
        # The coordinator sends ca.crt; the hospital installs it and checks its fingerprint.
        Path(v["VILREF_CA_CERT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(consortium / "pki" / "ca.crt", v["VILREF_CA_CERT"])
        shown = check(run_cli(rb("vilref-client keys show", v, name)))
        r["fingerprints"][name] = {"hospital": hospital_fp, "coordinator": coordinator_fp, "show": shown.flat}
    r["cli"]["sites_after_onboarding"] = check(run_cli(rb("vilref-server sites", coord_vars)))
    mark("set-up and key ceremony done")

    home = root / "home-vilref"
    home.mkdir()
    coord_env = service_environment(coord_unit, coord_vars, home)
    site_env = {n: service_environment(site_unit, site_vars[n], home) for n in names}
    r["argv"] = {
        "coordinator": exec_start_argv(coord_unit, coord_env),
        **{n: exec_start_argv(site_unit, site_env[n]) for n in names},
    }
    r["env"] = {"coordinator": coord_env, **site_env}
    services: list[Service] = []
    logs = root / "journal"

    def service(name: str, log: str) -> Service:
        s = Service(name, r["argv"][name], r["env"][name], logs / log).start()
        services.append(s)
        return s

    try:
        # 3. `systemctl start vilref-coordinator`, then each hospital's vilref-site service; round 1.
        coord = service("coordinator", "coordinator-1.log")
        wait_for(lambda: _submissions(consortium) == 1, 180, "the run to be submitted", [coord])
        mark("run submitted")
        sites = {n: service(n, f"{n}-1.log") for n in names}
        wait_for(lambda: _round_completed(consortium, 1), RUN_TIMEOUT_S, "round 1", services, interval=1.0)
        mark("round 1 completed")
        r["processes_run1"] = {s.name: dict(s.seen) for s in services}
        # `systemctl stop vilref-coordinator` while round 2 starts: a clean interruption.
        r["coordinator_stop"] = [coord.systemctl_stop()]
        r["after_stop"] = _status(consortium)
        r["site_stop"] = {n: s.systemctl_stop() for n, s in sites.items()}
        mark("services stopped")
        r["cli"]["status"] = run_cli(rb("vilref-server status", coord_vars))
        r["model"] = root / "model.pt"
        export_cmd = with_options(rb("vilref-server export", coord_vars), round="1", o=str(r["model"]))
        r["cli"]["export"] = check(run_cli(export_cmd))

        # 4. The coordinator revokes site-b; site-a rotates its key (runbook B7, pki/README).
        r["cli"]["remove_site"] = check(run_cli(rb("vilref-server remove-site", coord_vars, "site-b")))
        va = site_vars["site-a"]
        old_keys = root / "site-a-old-keys"
        shutil.copytree(Path(va["VILREF_SITE_DIR"]) / "keys", old_keys)
        rotated = check(run_cli(rb("vilref-client keys rotate", va, "site-a")))
        shutil.copyfile(Path(va["VILREF_SITE_DIR"]) / "keys" / "node_key.pub", inbox / "site-a.pub")
        replaced = check(run_cli(rb("vilref-server pki replace-site-key", coord_vars, "site-a"), cwd=inbox))
        r["rotation"] = {"rotate": rotated.flat, "replace": replaced.flat, "old_keys": old_keys}
        r["cli"]["sites_after_revocation"] = check(
            run_cli(rb("vilref-server sites", coord_vars) + ["--all", "--json"])
        )
        # A stolen copy of site-a holding its retired key pair.
        stolen = root / "var-lib" / "site-a-stolen"
        ignore = shutil.ignore_patterns("state", "flwr_home", "logs", "keys")
        shutil.copytree(va["VILREF_SITE_DIR"], stolen, ignore=ignore)
        (stolen / "logs").mkdir()
        shutil.copytree(old_keys, stolen / "keys", ignore=shutil.ignore_patterns("retired"))
        mark("revoked and rotated")

        # 5. `systemctl start vilref-coordinator` again: the interrupted run resumes at round 2.
        coord2 = service("coordinator", "coordinator-2.log")
        wait_for(lambda: _submissions(consortium) == 2, 240, "the resumed run to be submitted", [coord2])
        mark("resumed run submitted")
        a2 = Service("site-a", r["argv"]["site-a"], site_env["site-a"], logs / "site-a-2.log").start()
        b2 = Service("site-b", r["argv"]["site-b"], site_env["site-b"], logs / "site-b-2.log").start()
        services += [a2, b2]
        b_supernode_log = Path(site_vars["site-b"]["VILREF_SITE_DIR"]) / "logs" / "supernode.log"
        b_offset = b_supernode_log.stat().st_size
        thief_argv = [
            str(local_bin() / "vilref-client"), "join", "--site-dir", str(stolen),
            "--server", f"127.0.0.1:{port}", "--ca", site_vars["site-a"]["VILREF_CA_CERT"],
            "--retry-s", "1", "--retry-for-s", "1",
        ]  # fmt: skip
        thief = subprocess.run(
            thief_argv, capture_output=True, text=True, timeout=240, env=site_env["site-a"], cwd=root
        )
        r["stolen_key"] = {"rc": thief.returncode, "output": " ".join((thief.stdout + thief.stderr).split())}
        r["stolen_key"]["supernode_log"] = (stolen / "logs" / "supernode.log").read_text(
            encoding="utf-8", errors="replace"
        )
        mark("retired key refused")
        wait_for(lambda: REFUSED_TEXT in b2.text(), 240, "the revoked site-b to be refused", [coord2, b2])
        mark("revoked site refused")
        coordinator_log = consortium / "logs" / "coordinator.log"
        online = "round 2: all 1 sites online"
        wait_for(
            lambda: online in coordinator_log.read_text(errors="replace"), 240, "site-a's new key", [coord2]
        )
        mark("rotated key online")
        r["revoked"] = {
            "join_output": " ".join(b2.text().split()),
            "supernode_log": b_supernode_log.read_text(encoding="utf-8", errors="replace")[b_offset:],
            "stop": b2.systemctl_stop(),
        }
        r["coordinator_stop"].append(coord2.systemctl_stop())
        r["site_a_stop_2"] = a2.systemctl_stop()
        mark("stopped")
        r["final"] = _status(consortium)
        r["coordinator_log"] = coordinator_log.read_text(encoding="utf-8", errors="replace")
        r["events"] = _all_events(consortium)
    finally:
        for s in services:
            s.close()
    r["total_s"] = time.monotonic() - t_start
    return r


def _all_events(consortium: Path) -> list[dict[str, Any]]:
    from server.db import CoordinatorDB

    db = CoordinatorDB(str(consortium / "coordinator.db"))
    try:
        return [
            {"kind": e.kind, "site": e.site_name, "message": e.message, "run": e.run_uid}
            for e in db.events(None, 500)
        ]
    finally:
        db.close()
