"""`[run] task = "head"`: run-config validation, what the coordinator sends, what a site makes of it.
(The whole federated run with real processes is in test_privacy_e2e.py.)"""

from __future__ import annotations

import pytest
import torch

from client.fed_head import head_config
from server.head_task import DP_PREFIX, TOTAL_ROUNDS, head_round_config, initial_head_record
from server.protocol import SiteRefusal
from server.run_config import RunConfigError, from_dict


def _cfg(**sections):
    base = {"run": {"task": "head", "rounds": 3, "model": "tiny"}, "train": {"batch_size": 16, "epochs": 2}}
    for k, v in sections.items():
        base[k] = v
    return from_dict(base)


def test_head_run_config_and_round_instruction():
    cfg = _cfg(privacy={"patient-dp": True, "patient-epsilon": 4.0, "patient-delta": 1e-4,
                        "max-grad-norm": 0.2})
    sent = head_round_config(cfg)
    assert sent == {"task": "head", TOTAL_ROUNDS: 3, DP_PREFIX + "epsilon": 4.0,
                    DP_PREFIX + "delta": 1e-4, DP_PREFIX + "max-grad-norm": 0.2}
    hc = head_config({"train.batch_size": 16, "train.epochs": 2, "seed": 5, **sent})
    assert hc.batch_size == 16 and hc.epochs == 2 and hc.seed == 5 and hc.mode == "frozen"
    assert hc.dp.epsilon == 4.0 and hc.dp.delta == 1e-4 and hc.dp.max_grad_norm == 0.2
    assert head_config({"train.epochs": 1, **head_round_config(_cfg())}).dp is None


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"queue_size": 64}}, "does not take queue_size"),
        ({"train": {"mode": "lora"}}, "head mode must be one of"),
        ({"run": {"task": "probe"}}, "run.task must be 'pretrain' or 'head'"),
        ({"run": {"task": "pretrain"}, "train": {}, "privacy": {"patient-dp": True, "patient-epsilon": 2.0}},
         "refused for the 'wscl' objective"),
        ({"privacy": {"patient-dp": True}}, "exactly one of privacy.patient-epsilon"),
    ],
)
def test_bad_head_runs_are_refused_at_init(sections, message):
    with pytest.raises(RunConfigError, match=message):
        _cfg(**sections)


def test_initial_arrays_hold_a_zero_head_and_the_encoder():
    torch.manual_seed(0)
    rec = initial_head_record(_cfg())
    keys = list(rec.keys())
    assert keys == sorted(keys)
    assert "head.linear.weight" in keys and any(k.startswith("encoder.tower.") for k in keys)
    w = rec["head.linear.weight"].numpy()
    assert w.shape == (19, 64) and not w.any()  # 19 ontology labels over the tiny ViT's 64-d features


def test_site_refuses_bad_head_settings():
    with pytest.raises(SiteRefusal, match="head settings rejected"):
        head_config({"train.batch_size": 0, "task": "head"})
