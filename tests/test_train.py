"""The local trainer: settings, schedule, optimiser groups, data order, exact resume, site state."""

from __future__ import annotations

import math

import pytest
import torch
from toy_pairs import NUM_LABELS, ToyPairs

from vilref_fed.model import build_model, load_model_config, shared_state_dict
from vilref_fed.train import SITE_STATE_FILE, BatchPlan, LocalTrainer, TrainConfig, collate_pairs
from vilref_fed.train.optim import lr_at, parameter_groups

torch.set_num_threads(1)


def small_config(**changes) -> TrainConfig:
    base = dict(lr=1e-3, batch_size=8, warmup_steps=3, queue_size=24, max_steps=6, seed=3, log_every=2)
    base.update(changes)
    return TrainConfig(**base)


def tiny_with_dropout():
    cfg = load_model_config("tiny").to_dict()
    cfg["vision"]["dropout"] = 0.1
    cfg["text"]["dropout"] = 0.1
    return cfg


# --- settings -------------------------------------------------------------------------------------
def test_train_config_defaults_and_toml(tmp_path):
    cfg = TrainConfig()
    assert (cfg.objective, cfg.queue_size, cfg.momentum, cfg.delta, cfg.gamma, cfg.lam) == (
        "wscl",
        4096,
        0.995,
        1.0,
        1.0,
        1.0,
    )
    top = tmp_path / "a.toml"
    top.write_text('objective = "clip"\nlr = 3e-5\nbatch_size = 16\nbetas = [0.9, 0.999]\n', encoding="utf-8")
    got = TrainConfig.from_toml(top)
    assert (got.objective, got.lr, got.batch_size, got.betas) == ("clip", 3e-5, 16, (0.9, 0.999))
    table = tmp_path / "b.toml"
    table.write_text("[train]\nqueue_size = 128\nwarmup_steps = 0\n", encoding="utf-8")
    assert TrainConfig.from_toml(table).queue_size == 128
    dumped = tmp_path / "c.toml"
    dumped.write_text(got.to_toml(), encoding="utf-8")
    assert TrainConfig.from_toml(dumped) == got


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate = 0.1\n", "unknown keys \\['learning_rate'\\]"),
        ('batch_size = "big"\n', "batch_size must be an integer"),
        ("batch_size = 1\n", "batch_size must be >= 2"),
        ('objective = "triplet"\n', "objective must be 'wscl' or 'clip'"),
        ("refill = 1\n", "refill must be true or false"),
        ("lr = [\n", "not valid TOML"),
    ],
)
def test_train_config_errors_are_one_line_and_actionable(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_toml(path)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 0, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 0, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg, 0, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(14, cfg, 0, 14) == pytest.approx(0.1)
    assert lr_at(100, cfg, 0, 14) == pytest.approx(0.1)
    # A later plan (e.g. the next federated round) restarts the cosine, without a second warm-up.
    assert lr_at(20, cfg, 20, 30) == pytest.approx(1.0)
    assert lr_at(25, cfg, 20, 30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    const = TrainConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert lr_at(0, const, 0, 10) == lr_at(50, const, 0, 10) == 2.0


def test_no_weight_decay_on_norms_biases_and_logit_scale():
    model = build_model("tiny")
    decay, keep = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in kept
    assert any("LayerNorm" in n or "layernorm" in n for n in kept)
    assert all(not n.endswith(".bias") for n in decayed)
    assert "image_proj.weight" in decayed and "text_proj.weight" in decayed
    assert len(kept) + len(decayed) == len(names)


# --- data order -----------------------------------------------------------------------------------
def test_batch_plan_covers_each_item_once_and_ranks_slice_the_global_batch():
    single = BatchPlan(40, 8, 1, drop_last=True, seed=1)
    double = BatchPlan(40, 4, 2, drop_last=True, seed=1)
    assert single.batches_per_epoch() == double.batches_per_epoch() == 5
    one = single.epoch_batches(0, 0)
    r0, r1 = double.epoch_batches(0, 0), double.epoch_batches(0, 1)
    assert sorted(i for b in one for i in b) == list(range(40))
    assert all(a + b == g for a, b, g in zip(r0, r1, one, strict=True))
    assert single.epoch_batches(1, 0) != one  # a new permutation every epoch
    assert BatchPlan(5, 8, 1, True, 0).batches_per_epoch() == 1  # tiny site: one smaller batch
    assert BatchPlan(3, 8, 2, True, 0).batches_per_epoch() == 0  # too few for 2 ranks


def test_collate_tokenizes_and_stacks():
    model = build_model("tiny")
    batch = collate_pairs(model)([ToyPairs(3)[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 32)
    assert batch["labels"].shape == (3, NUM_LABELS)


def test_dataset_that_breaks_the_item_contract_is_refused():
    trainer = LocalTrainer(build_model("tiny"), small_config())
    with pytest.raises(ValueError, match=r"\[3, 32, 32\]"):
        trainer.fit(ToyPairs(16, image_size=48), progress=False)
    with pytest.raises(ValueError, match="too few"):
        trainer.fit(ToyPairs(1), progress=False)
    with pytest.raises(ValueError, match="empty"):
        trainer.fit([], progress=False)


# --- training -------------------------------------------------------------------------------------
def test_fit_fills_the_queue_and_reports_scalar_metrics():
    trainer = LocalTrainer(build_model("tiny"), small_config(max_steps=3))
    metrics = trainer.fit(ToyPairs(40), progress=False)
    assert metrics["steps"] == 3 and metrics["samples"] == 24 and metrics["global_step"] == 3
    for key in (
        "loss",
        "loss_i2t",
        "loss_t2i",
        "loss_couple",
        "false_negatives",
        "refilled",
        "samples_per_s",
    ):
        assert math.isfinite(metrics[key]), key
    assert all(isinstance(v, float) for v in metrics.values())
    assert int(trainer.memory.queue_filled) == 24
    assert metrics["false_negatives"] > 0  # toy classes repeat within a batch
    assert metrics["refilled"] > 0  # vacancies were refilled from the queue after step 1
    # The momentum copy follows the online weights, but lags them.
    online = dict(trainer.model.named_parameters())
    momentum = dict(trainer.memory.momentum_encoder.named_parameters())
    assert not torch.equal(online["image_proj.weight"], momentum["image_proj.weight"])


def test_clip_objective_runs_without_momentum_encoders_or_queues():
    trainer = LocalTrainer(build_model("tiny"), small_config(objective="clip", max_steps=2))
    metrics = trainer.fit(ToyPairs(24), progress=False)
    assert trainer.memory is None
    assert "refilled" not in metrics and "false_negatives" not in metrics
    assert metrics["loss_couple"] == 0.0


def test_a_non_finite_loss_stops_training_before_any_update():
    data = ToyPairs(16)
    data.items[0]["image"] = torch.full_like(data.items[0]["image"], float("nan"))
    model = build_model("tiny")
    before = {k: v.clone() for k, v in shared_state_dict(model).items()}
    trainer = LocalTrainer(model, small_config(batch_size=16, max_steps=1))
    with pytest.raises(FloatingPointError, match="lower lr or check the data"):
        trainer.fit(data, progress=False)
    after = shared_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


class PowerCut(torch.utils.data.Dataset):
    """A dataset whose machine dies after `limit` item reads (mid-run, between checkpoints)."""

    def __init__(self, data, limit: int) -> None:
        self.data, self.limit, self.reads = data, limit, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads > self.limit:
            raise RuntimeError("power cut")
        return self.data[index]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_checkpoints_resume_exactly(tmp_path, grad_accum):
    """6 steps in one go == 6 steps that crash after step 4 (checkpoint at 3), resumed from that
    checkpoint in a fresh trainer: identical weights, queues, optimiser moments and counters, bit for bit."""
    data = ToyPairs(36, seed=2)  # 36 items / 8 per batch: epochs end mid-plan, position must carry over
    cfg = small_config(grad_accum=grad_accum)
    ckpt = tmp_path / "resume.pt"

    torch.manual_seed(11)
    straight = LocalTrainer(build_model(tiny_with_dropout()), cfg)
    straight.fit(data, max_steps=6, progress=False)

    torch.manual_seed(11)
    crashed = LocalTrainer(build_model(tiny_with_dropout()), cfg)
    reads_for_three_steps = 1 + 3 * 8 * grad_accum  # (+1: the item-contract check)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit(
            PowerCut(data, reads_for_three_steps + 3),
            max_steps=6,
            progress=False,
            checkpoint_path=ckpt,
            checkpoint_every=3,
        )
    assert crashed.global_step == 3

    torch.manual_seed(999)  # a different process: nothing may depend on the ambient RNG
    resumed = LocalTrainer(build_model(tiny_with_dropout()), cfg)
    resumed.load_checkpoint(ckpt)
    assert (resumed.global_step, resumed.plan_start, resumed.plan_end) == (3, 0, 6)
    resumed.fit(data, max_steps=3, progress=False)

    a, b = straight.state_dict(), resumed.state_dict()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["memory"].items():
        assert torch.equal(value, b["memory"][key]), key
    assert a["counters"] == b["counters"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_each_fit_call_gets_its_own_plan_unless_total_steps_spans_them():
    data = ToyPairs(24)
    rounds = LocalTrainer(build_model("tiny"), small_config(warmup_steps=0))
    rounds.fit(data, max_steps=2, progress=False)
    assert (rounds.plan_start, rounds.plan_end) == (0, 2)
    metrics = rounds.fit(data, max_steps=3, progress=False)  # e.g. the next federated round
    assert (rounds.plan_start, rounds.plan_end) == (2, 5)
    assert metrics["lr"] < 1e-3 * 0.3  # its cosine ended with the round
    spanning = LocalTrainer(build_model("tiny"), small_config(warmup_steps=0, total_steps=10))
    spanning.fit(data, max_steps=2, progress=False)
    metrics = spanning.fit(data, max_steps=3, progress=False)
    assert (spanning.plan_start, spanning.plan_end) == (0, 10)
    assert metrics["lr"] > 1e-3 * 0.5  # half-way through the 10-step cosine


def test_site_state_round_trips_without_online_weights(tmp_path):
    state_dir = tmp_path / "state"
    model = build_model("tiny")
    trainer = LocalTrainer(model, small_config(max_steps=2), state_dir=state_dir)
    trainer.fit(ToyPairs(24), progress=False)
    saved = torch.load(state_dir / SITE_STATE_FILE, weights_only=True)
    assert "model" not in saved  # the online weights are the server's business
    assert saved["counters"]["global_step"] == 2

    # Next round: fresh model object (weights would come from the server), same site state.
    again = LocalTrainer(build_model("tiny"), small_config(max_steps=2), state_dir=state_dir)
    assert again.global_step == 2
    assert torch.equal(again.memory.queue_image, trainer.memory.queue_image)
    assert int(again.memory.queue_filled) == 16
    again.fit(ToyPairs(24), progress=False)
    assert int(again.memory.queue_filled) == 24  # capped at queue_size

    with pytest.raises(ValueError, match="model config 'tiny'"):
        other = load_model_config("tiny").to_dict()
        other["name"] = "tiny-variant"
        LocalTrainer(build_model(other), small_config(), state_dir=state_dir)
    with pytest.raises(ValueError, match="queue size"):
        LocalTrainer(build_model("tiny"), small_config(queue_size=32), state_dir=state_dir)


def test_corrupt_trainer_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "resume.pt"
    bad.write_bytes(b"\x00garbage")
    trainer = LocalTrainer(build_model("tiny"), small_config())
    with pytest.raises(ValueError, match="not a readable trainer state"):
        trainer.load_checkpoint(bad)
    with pytest.raises(ValueError, match="does not exist"):
        trainer.load_checkpoint(tmp_path / "nope.pt")


def test_gradient_clipping_bounds_the_update():
    """Plain SGD, lr 1, constant schedule: the whole update is the clipped gradient, norm == grad_clip."""
    model = build_model("tiny")
    before = [p.detach().clone() for p in model.parameters()]
    cfg = small_config(
        optimizer="sgd",
        sgd_momentum=0.0,
        lr=1.0,
        weight_decay=0.0,
        warmup_steps=0,
        schedule="constant",
        grad_clip=0.01,
        objective="clip",
    )
    LocalTrainer(model, cfg).fit(ToyPairs(16), max_steps=1, progress=False)
    update = torch.sqrt(
        sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert update.item() == pytest.approx(0.01, rel=1e-3)


def test_progress_bar_and_loader_workers_paths_run(capsys):
    trainer = LocalTrainer(build_model("tiny"), small_config(num_workers=1, log_every=1))
    metrics = trainer.fit(ToyPairs(24), max_steps=2, progress=True)
    assert metrics["steps"] == 2
    err = capsys.readouterr().err
    assert "2/2" in err and "samples/s" in err
