"""Fast checks of the federation's parts (no processes): run config, reply checks, aggregation,
checkpoints and server-optimiser state, the Flower App stub, the FedProx term, the CLI, the DB.

Everything runs real code: Flower's own strategies and record types, real SQLite, real files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from typer.testing import CliRunner

from server import protocol
from server.checkpoints import (
    checkpoint_arrays,
    load_round_checkpoint,
    restore_strategy_state,
    save_round_checkpoint,
)
from server.federation import _NodesGrid, aggregate_metrics
from server.run_config import RunConfig, RunConfigError, from_dict, load_run_config, save_run_config
from server.update_checks import judge_norms, structural_check

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _serverapp_identity():
    """Messages are built inside a ServerApp process, where Flower has set the task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def _global() -> OrderedDict[str, np.ndarray]:
    return OrderedDict(
        [
            ("a.weight", RNG.normal(size=(4, 3)).astype(np.float32)),
            ("logit_scale", np.array(2.5, dtype=np.float32)),
        ]
    )


def _reply(arrays: dict[str, np.ndarray], metrics: dict | None = None, extra: dict | None = None) -> Message:
    content = {
        "arrays": ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in arrays.items())),
        "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10, "train_loss": 1.0}),
    }
    content.update(extra or {})
    return Message(RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)


# ----------------------------------------------------------------------------------------- run config
def test_run_config_roundtrip_and_errors(tmp_path):
    cfg = RunConfig()
    cfg.run.rounds, cfg.strategy.name, cfg.train = 7, "fedprox", {"batch_size": 16, "objective": "wscl"}
    save_run_config(cfg, tmp_path / "run.toml")
    back = load_run_config(tmp_path / "run.toml")
    assert back.to_dict() == cfg.to_dict()
    with pytest.raises(RunConfigError, match="unknown key run.roundz"):
        from_dict({"run": {"roundz": 3}})
    with pytest.raises(RunConfigError, match="sites.min_sites must be a int"):
        from_dict({"sites": {"min_sites": "two"}})
    with pytest.raises(RunConfigError, match="strategy.name"):
        from_dict({"strategy": {"name": "fedsgd"}})
    with pytest.raises(RunConfigError, match="privacy.mode"):
        from_dict({"privacy": {"mode": "magic"}})
    with pytest.raises(RunConfigError, match="unknown section"):
        from_dict({"servre": {}})
    (tmp_path / "bad.toml").write_text("[run\n")
    with pytest.raises(RunConfigError, match="not valid TOML"):
        load_run_config(tmp_path / "bad.toml")


# ----------------------------------------------------------------------------------------- reply checks
def test_good_update_is_accepted_with_exact_norm():
    g = _global()
    new = {k: v + np.float32(0.5) for k, v in g.items()}
    v = structural_check(_reply(new), g)
    assert v.ok and v.num_examples == 10
    ref = math.sqrt(sum(float(((new[k].astype(np.float64) - g[k]) ** 2).sum()) for k in g))
    assert v.update_norm == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda g: {**g, "a.weight": g["a.weight"] * np.float32("nan")}, "NaN or Inf"),
        (lambda g: {**g, "logit_scale": np.array(np.inf, dtype=np.float32)}, "NaN or Inf"),
        (lambda g: {**g, "a.weight": np.zeros((3, 4), np.float32)}, "shape"),
        (lambda g: {**g, "a.weight": g["a.weight"].astype(np.float64)}, "shape"),
        (lambda g: {**g, "queue_image": np.zeros((48, 32), np.float32)}, "unexpected"),
        (lambda g: {"a.weight": g["a.weight"]}, "missing"),
    ],
)
def test_malformed_or_poisoned_arrays_are_rejected(mutate, reason):
    g = _global()
    v = structural_check(_reply(mutate(dict(g))), g)
    assert not v.ok and reason in v.reason


@pytest.mark.parametrize(
    "metrics, extra, reason",
    [
        ({"num-examples": 10, "loss_curve": [1.0, 2.0]}, None, "not a scalar"),
        ({"num-examples": 10, "x" * 40: 1.0}, None, "not a scalar"),
        ({"train_loss": 1.0}, None, "num-examples"),
        ({"num-examples": 0}, None, "num-examples"),
        ({"num-examples": 10}, {"config": ConfigRecord({"report": "moderate NPDR OD"})}, "ConfigRecord"),
        ({"num-examples": 10}, {"more": MetricRecord({"a": 1.0})}, "one ArrayRecord and one MetricRecord"),
    ],
)
def test_replies_with_anything_but_scalar_metrics_are_rejected(metrics, extra, reason):
    g = _global()
    v = structural_check(_reply(g, metrics, extra), g)
    assert not v.ok and reason in v.reason


def test_absurd_norms_are_rejected_absolute_and_against_median():
    g = _global()

    def verdict(shift: float):
        return structural_check(_reply({k: v + np.float32(shift) for k, v in g.items()}), g)

    vs = [verdict(0.1), verdict(0.12), verdict(50.0)]
    judge_norms(vs, max_update_norm=1e4, max_norm_ratio=20.0)
    assert [v.ok for v in vs] == [True, True, False] and "median" in vs[2].reason
    vs = [verdict(0.1), verdict(50.0)]  # two updates: no median judgement, only the absolute limit
    judge_norms(vs, max_update_norm=1e4, max_norm_ratio=20.0)
    assert all(v.ok for v in vs)
    judge_norms(vs, max_update_norm=1.0, max_norm_ratio=20.0)
    assert [v.ok for v in vs] == [True, False] and "max_update_norm" in vs[1].reason


def test_metrics_are_example_weighted_and_skip_nan():
    g = _global()
    vs = [
        structural_check(
            _reply(g, {"num-examples": 10, "train_loss": 1.0, "val_macro_auc": float("nan")}), g
        ),
        structural_check(_reply(g, {"num-examples": 30, "train_loss": 3.0, "val_macro_auc": 0.8}), g),
    ]
    m = aggregate_metrics(vs)
    assert m["train_loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert m["val_macro_auc"] == pytest.approx(0.8) and m["num_examples"] == 40


# ----------------------------------------------------------------------------------------- strategies
def _cfg(name: str, **strategy) -> RunConfig:
    cfg = RunConfig()
    cfg.strategy.name = name
    for k, v in strategy.items():
        setattr(cfg.strategy, k, v)
    return cfg


def _site_updates(g, n=3):
    def noisy(v):
        return (v + RNG.normal(scale=0.1, size=v.shape)).astype(v.dtype)

    return [({k: noisy(v) for k, v in g.items()}, 10 * (i + 1)) for i in range(n)]


def _canonical(updates):
    return [_reply(u, {"num-examples": n}) for u, n in updates]


def test_fedavg_is_example_weighted_and_robust_strategies_match_numpy():
    from server.strategies import build_strategy

    g = _global()
    ups = _site_updates(g)
    w = np.array([n for _, n in ups], dtype=np.float64)
    for name, ref in [
        ("fedavg", lambda xs: np.tensordot(w / w.sum(), np.stack(xs), axes=1)),
        ("fedprox", lambda xs: np.tensordot(w / w.sum(), np.stack(xs), axes=1)),
        ("fedmedian", lambda xs: np.median(np.stack(xs), axis=0)),
    ]:
        strategy = build_strategy(_cfg(name))
        out, _ = strategy.aggregate_train(1, _canonical(ups))
        for k in g:
            np.testing.assert_allclose(out[k].numpy(), ref([u[k] for u, _ in ups]), rtol=1e-5, atol=1e-6)


def test_fedprox_sends_mu_and_configure_uses_only_chosen_nodes():
    from server.strategies import build_strategy

    strategy = build_strategy(_cfg("fedprox", proximal_mu=0.05))
    g = ArrayRecord(OrderedDict((k, Array(v)) for k, v in _global().items()))
    msgs = list(strategy.configure_train(3, g, ConfigRecord({"x": 1}), _NodesGrid(None, [11, 22])))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 22]
    cfg = msgs[0].content["config"]
    assert cfg["proximal-mu"] == pytest.approx(0.05) and cfg["server-round"] == 3


def test_fedadam_resumes_exactly_from_checkpoint(tmp_path):
    """Two rounds in one process == one round, checkpoint, fresh strategy restored, second round."""
    from server.strategies import build_strategy

    g0 = _global()
    rounds = [_site_updates(g0), _site_updates(g0)]

    def step(strategy, r, arrays):
        rec = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in arrays.items()))
        strategy.configure_train(r, rec, ConfigRecord(), _NodesGrid(None, [1, 2, 3]))  # type: ignore[arg-type]
        ups = [({k: arrays[k] + (u[k] - g0[k]) for k in arrays}, n) for u, n in rounds[r - 1]]
        out, _ = strategy.aggregate_train(r, _canonical(ups))
        return OrderedDict((k, a.numpy()) for k, a in out.items())

    cfg = _cfg("fedadam", server_lr=0.05)
    s1 = build_strategy(cfg)
    straight = step(s1, 2, step(s1, 1, g0))

    s2 = build_strategy(cfg)
    a1 = step(s2, 1, g0)
    save_round_checkpoint(tmp_path / "round-0001.pt", 1, a1, s2, {"run_uid": "x"})
    data = load_round_checkpoint(tmp_path / "round-0001.pt")
    assert data["round"] == 1 and set(data["strategy_state"]) == {"m_t", "v_t"}
    s3 = build_strategy(cfg)
    restore_strategy_state(s3, data["strategy_state"])
    resumed = step(s3, 2, checkpoint_arrays(data))
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k])
    assert resumed["logit_scale"].shape == ()  # 0-d arrays keep their shape through a checkpoint


def test_corrupt_checkpoint_is_refused(tmp_path):
    from server.checkpoints import CheckpointError

    bad = tmp_path / "round-0001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_round_checkpoint(bad)


# ----------------------------------------------------------------------------------------- packing
def test_pack_unpack_roundtrip_against_the_model_layout():
    import torch

    from vilref_fed.model import build_model, shared_state_dict

    sd = shared_state_dict(build_model("tiny"))
    spec = protocol.param_spec(sd)
    packed = protocol.pack(sd, spec)
    assert list(packed) == ["params.float32"]
    assert packed["params.float32"].shape == (sum(v.numel() for v in sd.values()),)
    back = protocol.unpack(packed, spec)
    assert list(back) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(torch.from_numpy(np.array(back[k])), v), k
    assert protocol.spec_from_json(protocol.spec_to_json(spec)) == spec
    # Every element belongs to exactly one parameter, in spec order.
    name, shape, _ = spec[3]
    start = sum(int(np.prod(s)) for _, s, _ in spec[:3])
    assert protocol.locate(spec, "params.float32", start) == name
    assert protocol.locate(spec, "params.float32", start + int(np.prod(shape)) - 1) == name
    with pytest.raises(ValueError, match="expected"):
        protocol.unpack({"params.float32": packed["params.float32"][:-1]}, spec)
    with pytest.raises(ValueError, match="do not match the parameter spec"):
        protocol.unpack({"params.float16": packed["params.float32"]}, spec)


def test_packed_nan_is_reported_by_parameter_name():
    g = _global()
    spec = protocol.param_spec(g)
    gp = protocol.pack(g, spec)
    bad = {k: v.copy() for k, v in gp.items()}
    bad["params.float32"][-1] = np.nan  # the last element: logit_scale (sorted after a.weight)
    v = structural_check(_reply(bad), gp, spec)
    assert not v.ok and "parameter logit_scale" in v.reason


# ----------------------------------------------------------------------------------------- protocol
def test_protocol_helpers():
    assert protocol.refusal_reason("<class 'server.protocol.SiteRefusal'>:<'ontology hash differs: x'>") == (
        "ontology hash differs: x"
    )
    assert protocol.compatible_versions("0.1.0", "0.1.7") and not protocol.compatible_versions(
        "0.1.0", "0.2.0"
    )
    assert protocol.config_hash({"b": 1, "a": [1, 2]}) == protocol.config_hash({"a": [1, 2], "b": 1})
    assert protocol.MAX_METRIC_NAME == max(len(k) for k in protocol.REPLY_METRICS)


def test_flower_app_stub_ships_no_code(tmp_path):
    """Flower's own FAB builder packs only pyproject.toml: sites run the code they installed."""
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    from server.flower_app import write_app_dir

    app = write_app_dir(tmp_path / "app", {"consortium-dir": "/x", "privacy.mode": "none", "resume": True})
    config, _ = load_and_validate(app / "pyproject.toml", check_module=True)  # components importable
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }
    assert config["tool"]["flwr"]["app"]["config"]["privacy.mode"] == "none"
    import io

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]


def test_repo_root_fab_would_carry_no_code():
    """`flwr run .` from the repository packs only metadata (fab-include in pyproject.toml)."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files

    root = Path(__file__).resolve().parents[1]
    names = (
        "pyproject.toml",
        "README.md",
        "server/app.py",
        "client/app.py",
        "vilref_fed/model/configs/tiny.json",
    )
    files = {p: root / p for p in names}
    fab, _ = build_fab_from_files({k: v for k, v in files.items() if v.exists()})
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == [
        ".info/CONTENT",
        "README.md",
        "pyproject.toml",
    ]


# ----------------------------------------------------------------------------------------- client side
def test_fedprox_term_adds_mu_times_distance_to_the_gradient():
    import torch

    from client.fed_train import proximal_term

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    w0 = {n: p.detach().clone() for n, p in lin.named_parameters()}
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(5, 3)
    plain = torch.autograd.grad(lin(x).pow(2).sum(), list(lin.parameters()))
    # The anchor is taken when the context opens: re-anchor at w0 by loading it first.
    with torch.no_grad():
        moved = {n: p.detach().clone() for n, p in lin.named_parameters()}
        for n, p in lin.named_parameters():
            p.copy_(w0[n])
    with proximal_term(lin, mu=0.3, grad_accum=1):
        with torch.no_grad():
            for n, p in lin.named_parameters():
                p.copy_(moved[n])
        lin.zero_grad()
        lin(x).pow(2).sum().backward()
        for (n, p), g in zip(lin.named_parameters(), plain, strict=True):
            torch.testing.assert_close(p.grad, g + 0.3 * (moved[n] - w0[n]))
    lin.zero_grad()
    lin(x).pow(2).sum().backward()  # hooks removed on exit
    for p, g in zip(lin.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_site_hardware_settings_win_and_federation_settings_come_from_the_server(tmp_path):
    from client.fed_train import train_config
    from server.protocol import SiteRefusal

    (tmp_path / "train.toml").write_text('[train]\nbatch_size = 4\nlr = 0.5\ndevice = "cpu"\n')
    cfg = train_config(
        tmp_path, {"train.batch_size": 16, "train.lr": 1e-3, "train.objective": "clip", "seed": 3}
    )
    assert cfg.batch_size == 4 and cfg.device == "cpu"  # hardware: the site decides
    assert (
        cfg.lr == pytest.approx(1e-3) and cfg.objective == "clip" and cfg.seed == 3
    )  # the consortium decides
    with pytest.raises(SiteRefusal, match="training settings rejected"):
        train_config(tmp_path, {"train.no_such_field": 1})


# ----------------------------------------------------------------------------------------- processes
def test_stop_kills_descendants_in_other_sessions(tmp_path):
    from server.processes import ManagedProcess, descendants

    script = tmp_path / "spawn.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    p = ManagedProcess("spawner", [sys.executable, str(script)], tmp_path / "log.txt").start()
    deadline = time.monotonic() + 30
    while not descendants(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = descendants(p.pid)
    assert kids, "the grandchild did not start"
    p.stop(timeout=5)
    for k in kids:
        assert (
            not Path(f"/proc/{k}").exists()
            or "Z" in Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1][:3]
        )


def test_children_die_with_a_sigkilled_parent(tmp_path):
    """`kill -9` of a coordinator: the SuperLink it started (die_with_parent) goes down too."""
    from server.processes import ManagedProcess, descendants

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from server.processes import ManagedProcess\n"
        "cmd = [sys.executable, '-c', 'import time; time.sleep(300)']\n"
        "ManagedProcess('child', cmd, Path(sys.argv[1])).start()\n"
        "time.sleep(300)\n"
    )
    p = ManagedProcess(
        "parent", [sys.executable, str(script), str(tmp_path / "child.log")], tmp_path / "p.log"
    )
    p.start()
    deadline = time.monotonic() + 60
    while not descendants(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = descendants(p.pid)
    p.kill_main()
    from server.processes import _alive

    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = (
        Path(f"/proc/{child}").exists()
        and Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    )
    assert not alive


def test_exit_with_parent_terminates_orphans(tmp_path):
    """A process started with VILREF_PARENT_PID exits once that parent is gone."""
    from server.processes import PARENT_ENV

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    child = subprocess.Popen(
        [sys.executable, "-c", "from server.processes import exit_with_parent; import time\n"
         "exit_with_parent(0.1)\ntime.sleep(60)"],
        env={**os.environ, PARENT_ENV: str(parent.pid)},
    )  # fmt: skip
    parent.wait()
    assert child.wait(timeout=30) != 0  # SIGTERM


# ----------------------------------------------------------------------------------------- CLI + DB
@pytest.fixture()
def consortium_dir(tmp_path):
    from server.cli import app

    d = tmp_path / "cons"
    res = CliRunner().invoke(app, ["init", "--dir", str(d), "--host", "fl.example.org", "--rounds", "2"])
    assert res.exit_code == 0, res.output
    return d


def test_cli_init_add_remove_sites(consortium_dir, tmp_path):
    from server.cli import app
    from vilref_fed.security import certificate_info, ensure_node_key

    runner = CliRunner()
    c = consortium_dir
    assert {"fl.example.org", "localhost", "127.0.0.1"} <= set(
        certificate_info(c / "pki" / "server.crt").sans
    )
    cfg = load_run_config(c / "run.toml")
    assert cfg.run.rounds == 2 and len(cfg.run.ontology_hash) == 64 and len(cfg.run.model_config_hash) == 64
    res = runner.invoke(app, ["init", "--dir", str(c)])
    assert res.exit_code == 2 and "already holds a consortium" in res.output

    k1 = ensure_node_key(tmp_path / "k1")
    res = runner.invoke(app, ["add-site", "hosp-a", "--public-key", str(k1.public_path), "--dir", str(c)])
    assert res.exit_code == 0 and k1.fingerprint in res.output
    for args, msg in [
        (["add-site", "hosp-a", "--public-key", str(k1.public_path)], "already registered"),
        (["add-site", "hosp-b", "--public-key", str(k1.public_path)], "already registered for site"),
        (["add-site", "9bad name", "--public-key", str(k1.public_path)], "not valid"),
        (["add-site", "hosp-c", "--public-key", str(tmp_path / "nope.pub")], "not found"),
        (["remove-site", "hosp-z"], "no active site"),
    ]:
        res = runner.invoke(app, [*args, "--dir", str(c)])
        assert res.exit_code == 2 and msg in " ".join(res.output.split()), (args, res.output)
        assert "Traceback" not in res.output
    res = runner.invoke(app, ["sites", "--dir", str(c), "--json"])
    data = json.loads(res.output)
    assert [(d["name"], d["status"], d["registered"]) for d in data] == [("hosp-a", "active", False)]
    assert runner.invoke(app, ["remove-site", "hosp-a", "--dir", str(c)]).exit_code == 0
    k2 = ensure_node_key(tmp_path / "k2")
    res = runner.invoke(app, ["add-site", "hosp-a", "--public-key", str(k2.public_path), "--dir", str(c)])
    assert res.exit_code == 0, res.output  # a removed site can come back with a new key


def test_cli_status_export_and_start_errors_are_one_line(consortium_dir, tmp_path):
    from server.cli import app

    runner = CliRunner()
    c = str(consortium_dir)
    res = runner.invoke(app, ["status", "--dir", c, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["run"] is None
    for args, msg in [
        (["export", "--dir", c, "-o", str(tmp_path / "m.pt")], "no run"),
        (["start", "--dir", c, "--no-live"], "sites.min_sites = 2"),
        (["start", "--dir", c, "--no-live", "--resume"], "sites.min_sites"),
        (["status", "--dir", str(tmp_path / "nowhere")], "does not exist"),
        (["logs", "--dir", c, "--superlink"], "does not exist yet"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and msg in " ".join(res.output.split()), (args, res.output)
        assert "Traceback" not in res.output


def test_database_migrations_are_idempotent_and_status_reads_it(tmp_path):
    from server.db import CoordinatorDB, RoundRow, RunRow
    from server.live import status_dict, status_renderable

    url = str(tmp_path / "c.db")
    db = CoordinatorDB(url)
    with db.session() as s:
        run = RunRow(uid="abc", rounds_planned=2, config_json="{}")
        s.add(run)
        s.flush()
        s.add(RoundRow(run_id=run.id, round_no=1, status="completed", metrics_json='{"train_loss": 1.5}'))
    db.close()
    db = CoordinatorDB(url)  # re-open: migrations already applied, data kept
    st = status_dict(db)
    assert st["run"]["uid"] == "abc" and st["rounds"][0]["metrics"] == {"train_loss": 1.5}
    assert status_renderable(st) is not None
    db.close()
