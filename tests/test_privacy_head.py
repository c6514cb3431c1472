"""The supervised head under Opacus: epsilon is reported, the patient is the unit, the budget holds
across federated rounds, and bad settings get one clear message."""

from __future__ import annotations

import math

import pytest
import torch

from vilref_fed.model import build_model
from vilref_fed.privacy.accounting import site_level_epsilon
from vilref_fed.train.head import (
    FeatureTable,
    HeadConfig,
    PatientFeatureSet,
    evaluate_head,
    initial_head_arrays,
    train_head,
    train_head_round,
)
from vilref_fed.train.privacy import DPSGDConfig, PrivacyBudgetExhausted

LABELS = ("a", "b", "c", "d")


class SeparableImages(torch.utils.data.Dataset):
    """Images whose labels are visible (a bright band per label), two images per patient, following
    the trainer's item contract. Small enough for a unit test, learnable enough to check training."""

    def __init__(self, n: int, seed: int, with_patients: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.rand(n, len(LABELS), generator=g) < 0.35).float()
        self.x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
        for j in range(len(LABELS)):
            rows = slice(8 * j, 8 * j + 8)
            self.x[:, :, rows, :] += 2.0 * self.y[:, j, None, None, None]
        self.with_patients = with_patients

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.x[i], "labels": self.y[i], "text": "", "image_id": f"img{i}"}
        if self.with_patients:
            item["patient_key"] = f"patient{i // 2}"
        return item


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_model("tiny")


@pytest.fixture(scope="module")
def data():
    return SeparableImages(160, seed=1), SeparableImages(80, seed=2)


def test_head_learns_without_dp(model, data):
    train, val = data
    result = train_head(model, train, HeadConfig(epochs=15, batch_size=32))
    auc = evaluate_head(model, result.head, val, HeadConfig(), LABELS)["macro_auc"]
    assert auc > 0.8, auc
    assert "epsilon" not in result.metrics and result.unit == "patient"


def test_opacus_head_training_reports_epsilon_for_a_target(model, data):
    train, val = data
    cfg = HeadConfig(epochs=4, batch_size=16, dp=DPSGDConfig(epsilon=3.0, delta=1e-5, max_grad_norm=1.0))
    result = train_head(model, train, cfg, deterministic_seed=0)
    m = result.metrics
    assert m["epsilon"] == pytest.approx(3.0, rel=0.02) and m["epsilon"] <= 3.0 * 1.001
    assert m["delta"] == 1e-5 and m["noise_multiplier"] > 0.5
    assert m["units"] == 80 and m["images"] == 160 and m["privacy_unit_patient"] == 1.0
    assert m["sample_rate"] == pytest.approx(16 / 80)
    assert result.accountant_state["history"]
    per_epoch = [h["epsilon"] for h in result.history]  # epsilon per epoch, growing to the target
    assert len(per_epoch) == 4 and per_epoch == sorted(per_epoch) and per_epoch[-1] == m["epsilon"]
    assert math.isfinite(evaluate_head(model, result.head, val, cfg, LABELS)["macro_auc"])


def test_noise_multiplier_path_matches_an_independent_rdp_computation(model, data):
    train, _ = data
    cfg = HeadConfig(epochs=2, batch_size=20, dp=DPSGDConfig(noise_multiplier=1.1, delta=1e-5))
    result = train_head(model, train, cfg, deterministic_seed=0)
    steps = int(result.metrics["steps"])
    assert steps == 2 * 4  # 80 patients, expected batch 20: 4 Poisson steps per epoch
    expected = site_level_epsilon(1.1, steps, 1e-5, sample_rate=20 / 80)
    assert result.metrics["epsilon"] == pytest.approx(expected, rel=1e-6)


def test_finetune_mode_trains_the_image_tower_under_dp(data):
    torch.manual_seed(3)
    tiny = build_model("tiny")
    before = {k: v.clone() for k, v in tiny.image_tower.state_dict().items()}
    train, _ = data
    cfg = HeadConfig(mode="finetune", epochs=1, batch_size=20, dp=DPSGDConfig(epsilon=5.0, delta=1e-5))
    result = train_head(tiny, train, cfg, deterministic_seed=0)
    assert result.metrics["epsilon"] == pytest.approx(5.0, rel=0.02)
    moved = sum(float((tiny.image_tower.state_dict()[k] - v).abs().sum()) for k, v in before.items())
    assert moved > 0 and result.encoder is not None


def test_federated_rounds_accumulate_one_budget_per_site(model, data, tmp_path):
    train, val = data
    cfg = HeadConfig(epochs=2, batch_size=16, dp=DPSGDConfig(epsilon=4.0, delta=1e-5))
    arrays = initial_head_arrays(model, len(LABELS))
    eps = []
    for _ in range(2):
        arrays, metrics = train_head_round(arrays, model, train, cfg, num_labels=len(LABELS),
                                           label_ids=LABELS, val_set=val, state_dir=tmp_path,
                                           run_key="run-7", total_rounds=2)
        eps.append(metrics["epsilon"])
        assert set(metrics) >= {"num-examples", "train_loss", "epsilon", "delta", "dp_sigma", "val_macro_auc"}
        assert all(isinstance(v, float) for v in metrics.values())
        assert max(len(k) for k in metrics) <= 13  # the coordinator's limit on metric names
    assert 0 < eps[0] < eps[1] and eps[1] == pytest.approx(4.0, rel=0.02)
    assert set(arrays) == {"head.linear.weight", "head.linear.bias"}
    with pytest.raises(PrivacyBudgetExhausted, match="budget 4.0"):
        train_head_round(arrays, model, train, cfg, num_labels=len(LABELS), state_dir=tmp_path,
                         run_key="run-7", total_rounds=2)
    # another run starts its own budget
    _, fresh = train_head_round(arrays, model, train, cfg, num_labels=len(LABELS), state_dir=tmp_path,
                                run_key="run-8", total_rounds=2)
    assert fresh["epsilon"] < eps[1]


def test_patient_is_the_unit_and_images_per_patient_are_capped():
    keys = ["p1", "p1", "p1", "p2", "p3", "p3"]
    table = FeatureTable(torch.arange(12.0).reshape(6, 2), torch.zeros(6, 3), keys, "patient")
    units = PatientFeatureSet(table, max_images_per_patient=2, seed=0)
    assert len(units) == 3 and units.dropped_images == 1
    assert units.mask.tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert units.x[1, 0].tolist() == [6.0, 7.0]


def test_without_patient_keys_the_unit_is_the_image(model):
    data = SeparableImages(20, seed=5, with_patients=False)
    result = train_head(model, data, HeadConfig(epochs=1, batch_size=5, dp=DPSGDConfig(noise_multiplier=1.0)))
    assert result.unit == "image" and result.metrics["units"] == 20
    assert result.metrics["privacy_unit_patient"] == 0.0


def test_empty_poisson_batches_do_not_break_training(model):
    data = SeparableImages(6, seed=6)  # 3 patients, expected batch 1: empty batches are likely
    cfg = HeadConfig(epochs=10, batch_size=1, dp=DPSGDConfig(noise_multiplier=1.0))
    result = train_head(model, data, cfg, deterministic_seed=1)
    assert result.metrics["steps"] == 30 and math.isfinite(result.metrics["train_loss"])


@pytest.mark.parametrize(
    "dp, message",
    [
        (DPSGDConfig(), "exactly one of --epsilon or --noise-multiplier"),
        (DPSGDConfig(epsilon=1.0, noise_multiplier=1.0), "exactly one of"),
        (DPSGDConfig(epsilon=-2.0), "epsilon must be a positive"),
        (DPSGDConfig(epsilon=2.0, delta=2.0), "delta must be strictly between 0 and 1"),
        (DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.0), "max grad norm must be a positive"),
        (DPSGDConfig(noise_multiplier=1.0, accountant="moments"), "accountant must be 'rdp' or 'prv'"),
    ],
)
def test_bad_dp_settings_are_refused(model, data, dp, message):
    with pytest.raises(ValueError, match=message):
        train_head(model, data[0], HeadConfig(epochs=1, dp=dp))


def test_empty_dataset_is_refused(model):
    with pytest.raises(ValueError, match="dataset is empty"):
        train_head(model, SeparableImages(0, seed=1), HeadConfig())
