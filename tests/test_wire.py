"""What goes on the wire: the ClientApp's real reply, the server's record of it, and refusals.

The end-to-end test (test_federation_e2e.py) checks every reply the server received during real
runs; these tests call the real ClientApp handler in-process on a real (synthetic, ingested) site,
so the content of a reply can be inspected value by value, quickly.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from server import protocol
from server.update_checks import reply_structure

QUEUE_SIZE = 48


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from vilref_fed.data.ingest import IngestOptions, ingest
    from vilref_fed.data.site import init_site
    from vilref_fed.data.synthetic import generate_site

    root = tmp_path_factory.mktemp("wire")
    gen = root / "gen"
    generate_site(gen, 24, "myopia-clinic", seed=5, dicom=True)
    s = init_site(root / "site", "wire-site", language="zh", image_size=48)
    try:
        ingest(s, IngestOptions(dicom=[gen / "dicom"], reports=[gen / "reports.csv"]))
    finally:
        s.close()
    shutil.rmtree(gen)
    return root / "site"


def _instruction(model_name: str = "tiny", **overrides) -> Message:
    import vilref_fed
    from server.global_model import initial_arrays, initial_state, model_config_hash
    from vilref_fed.ontology import load_ontology

    cfg = {
        protocol.ROUND: 1, protocol.RUN_UID: "wiretest", protocol.TOOLKIT_VERSION: vilref_fed.__version__,
        protocol.MODEL_NAME: model_name, protocol.MODEL_CONFIG_HASH: model_config_hash(model_name),
        protocol.ONTOLOGY_HASH: load_ontology().hash, protocol.LOCAL_EPOCHS: 0, protocol.LOCAL_STEPS: 2,
        protocol.EVALUATE: True, protocol.PROMPT_LANGUAGE: "zh", protocol.SEED: 0,
        "train.batch_size": 8, "train.queue_size": QUEUE_SIZE, "train.warmup_steps": 0,
    }  # fmt: skip
    state = initial_state(model_name, 0)
    spec = protocol.param_spec(state)
    cfg[protocol.PARAM_SPEC], cfg[protocol.PARAM_SPEC_HASH] = (
        protocol.spec_to_json(spec),
        protocol.spec_hash(spec),
    )
    cfg.update(overrides)
    content = RecordDict({protocol.ARRAYS: initial_arrays(model_name, 0), protocol.CONFIG: ConfigRecord(cfg)})
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink assigns on push
    return msg


def _context(site_dir: Path) -> Context:
    return Context(
        run_id=7, node_id=1, node_config={"site-dir": str(site_dir)}, state=RecordDict(), run_config={}
    )


def test_clientapp_reply_holds_only_shared_parameters_and_scalar_metrics(site):
    import numpy as np
    import torch

    from client.app import train
    from vilref_fed.data.site_dataset import SiteDataset
    from vilref_fed.model import build_model, shared_state_dict

    reply = train(_instruction(), _context(site))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {protocol.ARRAYS, protocol.METRICS}
    arrays, metrics = reply.content[protocol.ARRAYS], reply.content[protocol.METRICS]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    expected = shared_state_dict(build_model("tiny"))
    spec = protocol.param_spec(expected)
    # On the wire: one packed float32 vector with exactly as many values as the shared parameters.
    assert {k: tuple(a.shape) for k, a in arrays.items()} == {
        "params.float32": (sum(v.numel() for v in expected.values()),)
    }
    named = protocol.unpack({k: a.numpy() for k, a in arrays.items()}, spec)
    assert list(named) == sorted(expected)
    for k, a in named.items():
        assert tuple(a.shape) == tuple(expected[k].shape) and str(a.dtype) == "float32", k
        assert np.isfinite(a).all()
    n_train = len(SiteDataset(site, "train"))
    for k, v in metrics.items():
        assert k in protocol.REPLY_METRICS and isinstance(v, (int, float)), (k, v)
    assert metrics[protocol.NUM_EXAMPLES] == n_train
    assert metrics["train_steps"] == 2.0
    assert "eval_s" in metrics  # zero-shot evaluation ran inside the train reply
    # The site's momentum encoders and queues stayed home, in the site directory.
    state = list((site / "state" / "federation" / "wiretest").glob("site_state.pt"))
    assert len(state) == 1
    saved = torch.load(state[0], weights_only=False, map_location="cpu")
    assert any("queue" in k for k in _flat_keys(saved)), "the queues are site state"
    # No report text anywhere in the reply.
    from vilref_fed.data.site_dataset import load_records

    texts = [r.text for r in load_records(site)[0]]
    blob = repr(reply_structure(reply)) + repr(dict(metrics))
    assert not any(t and t[:20] in blob for t in texts)


def _flat_keys(obj, prefix: str = "") -> list[str]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(f"{prefix}{k}")
            out.extend(_flat_keys(v, f"{prefix}{k}."))
    return out


def test_site_refuses_a_different_ontology_with_a_message_saying_so(site):
    from client.app import train
    from server.protocol import SiteRefusal

    with pytest.raises(SiteRefusal, match="ontology hash differs") as err:
        train(_instruction(**{protocol.ONTOLOGY_HASH: "f" * 64}), _context(site))
    assert "ffffffffffff" in str(err.value)
    log = (site / "logs" / "federation.log").read_text(encoding="utf-8")
    assert "refused: ontology hash differs" in log


def test_site_refuses_a_different_model_config(site):
    from client.app import train
    from server.protocol import SiteRefusal

    with pytest.raises(SiteRefusal, match="model config 'tiny' differs"):
        train(_instruction(**{protocol.MODEL_CONFIG_HASH: "0" * 64}), _context(site))
    with pytest.raises(SiteRefusal, match="toolkit version differs"):
        train(_instruction(**{protocol.TOOLKIT_VERSION: "9.9.0"}), _context(site))


def test_reply_structure_records_shapes_and_lengths_never_values():
    import numpy as np
    from flwr.app import Array

    secret = "Patient Zhang Wei, moderate NPDR OD"
    msg = Message(
        RecordDict({
            "arrays": ArrayRecord(OrderedDict([("w", Array(np.zeros((2, 3), "float32")))])),
            "metrics": MetricRecord({"num-examples": 3, "train_loss": 0.5}),
            "config": ConfigRecord({"note": secret}),
        }),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )  # fmt: skip
    s = reply_structure(msg)
    assert s["records"]["arrays"]["type"] == "ArrayRecord"
    w = s["records"]["arrays"]["arrays"]["w"]
    assert w["shape"] == [2, 3] and w["dtype"] == "float32" and w["nbytes"] >= 24
    assert s["records"]["metrics"]["metrics"] == {"num-examples": "int", "train_loss": "float"}
    assert s["records"]["config"]["values"] == {"note": f"str[{len(secret)}]"}
    assert secret not in repr(s)
