"""DDP inside one hospital: 2 CPU processes (gloo) reproduce the single-process run on the same global batch.

Each rank sees half of every global batch; features are gathered so the loss is the global-batch
loss, and BatchExpansion.enqueue gathers the momentum features in rank order. After a few steps
the queues (and the online weights) must match a single process trained with the full batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from toy_pairs import ToyPairs  # noqa: E402

from vilref_fed.model import build_model  # noqa: E402
from vilref_fed.train import LocalTrainer, TrainConfig  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8


def _config(batch_size: int) -> TrainConfig:
    # 24 items, global batch 8: step 3 ends the epoch; queue 20 < 3 x 8 so it wraps around.
    # SGD, not AdamW: Adam normalises each parameter's gradient, so it would hide a gradient that DDP
    # got wrong by a constant factor (e.g. the logit scale counted once per rank); SGD exposes it.
    return TrainConfig(
        optimizer="sgd",
        lr=0.5,
        batch_size=batch_size,
        warmup_steps=1,
        queue_size=20,
        max_steps=STEPS,
        seed=5,
    )


def _train(batch_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    trainer = LocalTrainer(build_model("tiny"), _config(batch_size))
    trainer.fit(ToyPairs(24, seed=3), progress=False)
    state = {f"memory.{k}": v for k, v in trainer.memory.site_state_dict().items()}
    state.update({f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()})
    return state


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _train(GLOBAL_BATCH // world)
        torch.save(state, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_process_gloo_ddp_matches_single_process_queues(tmp_path):
    torch.set_num_threads(1)
    single = _train(GLOBAL_BATCH)

    out = str(tmp_path / "ddp_state")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]

    assert int(single["memory.queue_filled"]) == 20 and int(single["memory.queue_ptr"]) == 4  # wrapped
    for key in ("memory.queue_ptr", "memory.queue_filled", "memory.queue_labels"):
        assert torch.equal(ranks[0][key], single[key]), key
        assert torch.equal(ranks[1][key], single[key]), key
    for key in ("memory.queue_image", "memory.queue_text"):
        torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=2e-5)
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds the same queue
    # The online weights agree too: the global-batch loss and its gradient are reproduced exactly
    # (up to float summation order), including the logit scale.
    for key, value in single.items():
        if key.startswith("model.") and torch.is_floating_point(value):
            torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=2e-5, msg=key)
