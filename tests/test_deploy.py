"""Deployment files checked without starting a federation: the systemd units (parsed, hardened,
`systemd-analyze verify`), their environment files, the runbook's commands (every one parses against
the real CLI; the ones it quotes as "what the service runs" are the units' ExecStart lines), the
compose file (against the Compose Specification schema, and running the units' commands), the
Containerfile and the pinned requirements, and the offline settings of every process definition.

The units' ExecStart lines are *run* in tests/test_deploy_units_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_scenario import (
    CONTAINER_DIR,
    COORDINATOR_UNIT,
    INSTALL_BIN,
    PKI_README,
    PROGRAMS,
    REPO,
    RUNBOOK,
    SITE_UNIT,
    SYSTEMD_DIR,
    UNITS,
    env_file_for,
    exec_start_argv,
    fill,
    find_command,
    local_bin,
    parse_env_file,
    parse_only,
    parse_unit,
    runbook_commands,
    sh_blocks,
    unit_environment,
    vilref_commands,
)

from vilref_fed.offline import OFFLINE_ENV

# Beyond vilref_fed.offline.OFFLINE_ENV: no package index for pip, and uv (which Flower would run
# for runtime dependency installation) offline.
NO_INSTALL_ENV = {"PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}
EXPECTED_OFFLINE = {**OFFLINE_ENV, **NO_INSTALL_ENV}
COMPOSE = CONTAINER_DIR / "compose.yaml"
CONTAINERFILE = CONTAINER_DIR / "Containerfile"
DEMO_SETUP = CONTAINER_DIR / "demo-setup.sh"
LOCK = CONTAINER_DIR / "requirements.lock"
STATE_ROOT = "/var/lib/vilref-fed"
FORBIDDEN_AT_RUN_TIME = re.compile(
    r"\b(pip|uv|curl|wget|apt-get|conda)\b|--allow-runtime-dependency-installation|--insecure"
)
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "UMask": "0027",
}


def _dummy_vars(argv: list[str]) -> dict[str, str]:
    names = {m for w in argv for m in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", w)}
    return {n: "1" if n == "seed" else f"/x/{n.lower()}" for n in names}  # demo-setup.sh's $seed is a number


def _compose() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_runs_as_a_dedicated_user_restarts_on_failure_and_is_hardened(path: Path):
    u = parse_unit(path)
    assert u.value("Service", "User") == "vilref" and u.value("Service", "Group") == "vilref"
    assert u.value("Service", "Restart") == "on-failure"
    assert u.value("Service", "RestartPreventExitStatus") == "2"  # one-line config errors: no loop
    assert u.value("Service", "Type") == "exec"
    assert u.value("Service", "KillMode") == "mixed"  # SIGTERM to vilref-*, which stops its tree
    for key, value in HARDENING.items():
        assert u.value("Service", key) == value, key
    assert u.values("Service", "ReadWritePaths") == [STATE_ROOT]
    assert u.value("Service", "StateDirectory") == "vilref-fed"
    assert u.value("Service", "EnvironmentFile").startswith("/etc/vilref-fed/")
    assert "network-online.target" in u.value("Unit", "After")
    assert not u.values("Service", "MemoryDenyWriteExecute")  # PyTorch needs W+X pages


def test_coordinator_unit_resumes_and_never_starts_a_run_at_boot():
    u = parse_unit(COORDINATOR_UNIT)
    argv = exec_start_argv(u, {"VILREF_CONSORTIUM_DIR": "/c"})
    assert argv[:2] == [f"{INSTALL_BIN}/vilref-server", "start"] and "--resume-if-interrupted" in argv
    assert "--no-live" in argv  # no terminal under systemd
    assert "130" in u.value("Service", "SuccessExitStatus").split()  # `systemctl stop` is not a failure
    assert "Install" not in u.sections  # a reboot must not start a new training run
    assert u.value("Service", "PrivateDevices") == "yes"


def test_site_unit_is_enabled_at_boot_and_may_use_gpus_only():
    u = parse_unit(SITE_UNIT)
    assert u.value("Install", "WantedBy") == "multi-user.target"
    assert u.value("Service", "DevicePolicy") == "closed"
    assert all(v.startswith("char-nvidia") for v in u.values("Service", "DeviceAllow"))


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_environment_file_directories_are_the_writable_ones_and_hold_no_secret(path: Path):
    u = parse_unit(path)
    env_file = env_file_for(u)
    values = parse_env_file(env_file)
    argv = exec_start_argv(u, values)  # every variable ExecStart uses is set in the file
    assert argv
    rw = u.values("Service", "ReadWritePaths")
    for key in ("VILREF_CONSORTIUM_DIR", "VILREF_SITE_DIR"):
        if key in values:
            assert any(values[key] == p or values[key].startswith(p + "/") for p in rw), key
    for key, value in values.items():
        assert not re.search(r"pass|secret|token|private|_key$", key, re.I), key
        assert "PRIVATE KEY" not in value
    text = path.read_text(encoding="utf-8") + env_file.read_text(encoding="utf-8")
    assert "PRIVATE KEY" not in text and "BEGIN " not in text
    assert not (set(values) & set(EXPECTED_OFFLINE))  # offline settings are not the site's to change


@pytest.fixture(scope="module")
def installed_units(tmp_path_factory) -> Path:
    """The units as installed, with /opt/vilref-fed/venv standing for this checkout's virtualenv."""
    d = tmp_path_factory.mktemp("units")
    venv = str(local_bin().parent)
    for path in UNITS:
        text = path.read_text(encoding="utf-8").replace(str(Path(INSTALL_BIN).parent), venv)
        (d / path.name).write_text(text, encoding="utf-8")
    return d


def test_systemd_analyze_verify_accepts_the_units(installed_units: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine (the units are still parsed above)")
    names = [str(installed_units / p.name) for p in UNITS]
    res = subprocess.run(
        ["systemd-analyze", "verify", *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=installed_units,
    )
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if any(p.name in ln for p in UNITS)]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_rates_the_units_exposure_at_most_3(installed_units: Path, path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=30", str(installed_units / path.name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "Unknown command verb" in res.stderr or "unrecognized option" in res.stderr:
        pytest.skip(f"this systemd cannot rate unit files offline: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr


def test_sysusers_file_creates_an_unprivileged_system_account(tmp_path: Path):
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed on this machine")
    (tmp_path / "etc").mkdir()
    conf = SYSTEMD_DIR / "vilref-fed.sysusers.conf"
    res = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    line = [ln for ln in (tmp_path / "etc" / "passwd").read_text().splitlines() if ln.startswith("vilref:")]
    name, _, uid, _, _, home, shell = line[0].split(":")
    assert 0 < int(uid) < 1000 and home == STATE_ROOT and shell.endswith("nologin")


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_exec_start_parses_against_the_cli(path: Path):
    u = parse_unit(path)
    argv = exec_start_argv(u, parse_env_file(env_file_for(u)))
    program = Path(argv[0]).name
    assert program in PROGRAMS and (local_bin() / program).exists()
    parse_only([program, *argv[1:]])


# ----------------------------------------------------------------------------------------- runbook
def _all_documented_commands() -> list[tuple[str, list[str]]]:
    out = [("runbook", c) for c in runbook_commands(RUNBOOK)]
    out += [("pki/README", c) for c in runbook_commands(PKI_README)]
    out += [("README", c) for c in runbook_commands(RUNBOOK.parents[1] / "README.md")]
    out += [("demo-setup.sh", c) for c in vilref_commands(DEMO_SETUP.read_text(encoding="utf-8"))]
    for name, svc in _compose()["services"].items():
        cmd = svc.get("command")
        if cmd and cmd[0] in PROGRAMS:
            out.append((f"compose:{name}", list(cmd)))
    return out


def test_every_documented_command_parses_against_the_cli():
    commands = _all_documented_commands()
    assert len(commands) >= 30
    for where, argv in commands:
        try:
            parse_only(fill(argv, _dummy_vars(argv)))
        except Exception as err:  # click.UsageError and friends: report where it came from
            raise AssertionError(f"{where}: `{' '.join(argv)}` does not parse: {err}") from None


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_runbook_quotes_exactly_the_units_exec_start(path: Path):
    u = parse_unit(path)
    names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", u.value("Service", "ExecStart"))
    unit_argv = exec_start_argv(u, {n: f"${n}" for n in names})
    program = Path(unit_argv[0]).name
    quoted = find_command(runbook_commands(), program, unit_argv[1])
    assert [program, *unit_argv[1:]] == quoted


def test_runbook_commands_cover_the_key_ceremony_and_the_run():
    cmds = runbook_commands()
    for prefix in (
        ("vilref-client", "init"),
        ("vilref-client", "ingest"),
        ("vilref-client", "keys", "create"),
        ("vilref-client", "keys", "show"),
        ("vilref-client", "keys", "rotate"),
        ("vilref-client", "join"),
        ("vilref-server", "add-site"),
        ("vilref-server", "remove-site"),
        ("vilref-server", "pki", "replace-site-key"),
        ("vilref-server", "pki", "show"),
        ("vilref-server", "start"),
        ("vilref-server", "status"),
        ("vilref-server", "export"),
        ("vilref-server", "sites"),
    ):
        find_command(cmds, *prefix, exclude=("--renew-server-cert",))
    assert any(c[:2] == ["vilref-server", "init"] and "--renew-server-cert" in c for c in cmds)


def test_runbook_has_the_sections_hospital_it_and_the_coordinator_need():
    text = RUNBOOK.read_text(encoding="utf-8")
    headings = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    for words in (
        "What leaves the hospital",
        "Network and firewall",
        "sizing",
        "Install the software",
        "Stop, upgrade, uninstall",
        "Where data lives",
        "Onboard a site",
        "Start a run and watch it",
        "Resume after a failure",
        "Export and distribute",
        "Keys and certificates",
    ):
        assert words.lower() in headings.lower(), words


def test_runbook_references_files_and_units_that_exist():
    text = "\n".join(sh_blocks(RUNBOOK))
    for rel in sorted(set(re.findall(r"(?<![\w/])((?:deploy|docs)/[\w./-]+)", text))):
        assert (REPO / rel.rstrip("/")).exists(), rel
    for unit in set(re.findall(r"systemctl \w+(?: --now)? ([\w-]+)", text)):
        assert (SYSTEMD_DIR / f"{unit}.service").exists(), unit
    for rel in re.findall(r"\]\(\.\./([^)]+)\)", RUNBOOK.read_text(encoding="utf-8")):
        assert (REPO / rel).exists(), rel


# -------------------------------------------------------------------------------------- offline
@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_set_every_offline_variable(path: Path):
    u = parse_unit(path)
    env = unit_environment(u)
    for key, value in EXPECTED_OFFLINE.items():
        assert env.get(key) == value, key
    assert not FORBIDDEN_AT_RUN_TIME.search(u.value("Service", "ExecStart"))


def test_compose_services_and_image_are_offline():
    for name, svc in _compose()["services"].items():
        env = svc["environment"]
        for key, value in EXPECTED_OFFLINE.items():
            assert str(env.get(key)) == value, (name, key)
        assert not FORBIDDEN_AT_RUN_TIME.search(" ".join(svc["command"])), name
    final_env = _containerfile_final_env()
    for key, value in EXPECTED_OFFLINE.items():
        assert final_env.get(key) == value, key
    script = DEMO_SETUP.read_text(encoding="utf-8")
    assert not FORBIDDEN_AT_RUN_TIME.search(script)


def test_superlink_and_supernode_are_started_offline():
    """The processes the units start in turn: the SuperLink never installs dependencies and every
    Flower process gets the offline environment (observed for real in test_deploy_units_e2e)."""
    from client.supernode import SuperNodeSpec
    from server.consortium import Consortium
    from server.processes import flower_env
    from server.superlink import superlink_args

    args = superlink_args(Consortium(Path("/c")), "0.0.0.0", 9092)
    assert "--disable-runtime-dependency-installation" in args and "--insecure" not in args
    assert "--enable-supernode-auth" in args
    node = SuperNodeSpec(Path("/s"), "h:1", Path("/ca"), Path("/k"), 5).args()
    assert "--insecure" not in node and "--root-certificates" in node
    assert "--auth-supernode-private-key" in node
    env = flower_env(Path("/h"))
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())


# --------------------------------------------------------------------------------------- compose
def test_compose_file_validates_against_the_compose_spec_schema():
    import jsonschema

    schema = json.loads((CONTAINER_DIR / "vendor" / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    doc = _compose()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    broken = json.loads(json.dumps(doc))
    broken["services"]["coordinator"]["restart_policy"] = "always"  # not a Compose key
    assert list(validator.iter_errors(broken))  # the validator does reject a wrong file


def test_compose_long_running_services_run_the_units_commands():
    services = _compose()["services"]
    assert {"coordinator", "site-a", "site-b"} <= set(services)
    pairs = {"coordinator": COORDINATOR_UNIT, "site-a": SITE_UNIT, "site-b": SITE_UNIT}
    for name, unit_path in pairs.items():
        svc = services[name]
        argv = exec_start_argv(parse_unit(unit_path), {k: str(v) for k, v in svc["environment"].items()})
        assert [Path(argv[0]).name, *argv[1:]] == svc["command"], name
        assert svc["restart"] == "on-failure"
    assert services["site-a"]["environment"]["VILREF_SERVER"].startswith("coordinator:")


def test_compose_is_non_root_read_only_and_on_an_internal_network():
    doc = _compose()
    assert doc["networks"]["consortium"]["internal"] is True
    for name, svc in doc["services"].items():
        assert svc["user"].split(":")[0] not in ("0", "root"), name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["networks"] == ["consortium"] and "ports" not in svc, name
        assert svc["build"]["args"]["VARIANT"] in ("cpu", "cuda"), name
    # Each hospital sees only its own volume and (read-only when running) the exchange volume.
    for site in ("site-a", "site-b"):
        vols = doc["services"][site]["volumes"]
        assert vols == [f"{site}:/var/lib/vilref-fed", "exchange:/exchange:ro"], vols
    deps = doc["services"]["coordinator"]["depends_on"]
    assert deps["coordinator-setup"]["condition"] == "service_completed_successfully"


def test_demo_setup_script_is_valid_posix_shell():
    res = subprocess.run(["sh", "-n", str(DEMO_SETUP)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert DEMO_SETUP.stat().st_mode & 0o111  # executable (COPY keeps the mode; --chmod sets it too)


# ---------------------------------------------------------------------------------- Containerfile
def _containerfile_stages() -> list[list[str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text(encoding="utf-8"))
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def _containerfile_final_env() -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for line in _containerfile_stages()[-1]:
        if line.upper().startswith("ENV "):
            for word in shlex.split(line[4:]):
                k, _, v = word.partition("=")
                env[k] = v
    return env


def test_containerfile_builds_cpu_and_cuda_variants_from_pinned_packages_as_non_root():
    text = CONTAINERFILE.read_text(encoding="utf-8")
    stages = _containerfile_stages()
    assert len(stages) == 3  # preamble (ARG), build stage, runtime stage
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert (
        'cpu)  pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"'
        in text
    )
    assert 'cuda) pip install "torch==${TORCH_VERSION}"' in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "pip install -r /tmp/requirements.lock" in text
    assert "pip install --no-deps" in text and "pip check" in text
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.search(r":3\.11\.\d+-slim-bookworm$", base)  # pinned, and the Python pyproject requires
    runtime = stages[-1]
    users = [ln.split()[1] for ln in runtime if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for line in runtime:
        assert not re.match(r"RUN .*\b(pip|curl|wget)\b", line), line  # nothing fetched in the final image
    for line in (ln for st in stages for ln in st if ln.upper().startswith("COPY ") and "--from=" not in ln):
        for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
            assert (REPO / src).exists(), src


def test_requirements_lock_pins_the_whole_runtime_closure():
    import sys

    sys.path.insert(0, str(CONTAINER_DIR))
    try:
        import make_lock
    finally:
        sys.path.pop(0)
    from packaging.utils import canonicalize_name

    lines = [ln for ln in LOCK.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", ln)
        assert m, f"not an exact pin: {ln!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    for req in make_lock.direct_requirements():
        name = canonicalize_name(req.name)
        if make_lock.is_variant_package(name):
            assert name not in pins
            continue
        (spec,) = req.specifier
        assert spec.operator == "==" and pins.get(name) == spec.version, (name, spec)
    assert not [n for n in pins if make_lock.is_variant_package(n)]
    needed = {
        n for n in make_lock.closure(make_lock.direct_requirements()) if not make_lock.is_variant_package(n)
    }
    assert needed <= set(pins), sorted(needed - set(pins))
