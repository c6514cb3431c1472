"""BatchExpansion: momentum arithmetic, FIFO queue with wrap-around, site state, and DDP gathering.

The online model here is a small plain-torch dual encoder with the same encode_image/encode_text
interface as ViLReFModel (BatchExpansion is generic); BatchNorm and Dropout are there on purpose,
to check buffers and eval mode.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from vilref_fed.memory import BatchExpansion, concat_all_gather
from vilref_fed.objectives import WSCLLoss

torch.set_num_threads(1)

EMBED, LABELS = 6, 3


class TinyDualEncoder(nn.Module):
    """A real (small) dual encoder: image MLP with BatchNorm, text embedding bag with Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, EMBED))
        self.token = nn.EmbeddingBag(50, 16, mode="mean")
        self.text = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(self.token(input_ids, per_sample_weights=None)), dim=-1)

    def forward(self, images, input_ids, attention_mask):
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.logit_scale.exp().clamp(max=100),
        }


def batch(gen: torch.Generator, n: int):
    images = torch.randn(n, 12, generator=gen)
    ids = torch.randint(0, 50, (n, 7), generator=gen)
    labels = (torch.rand(n, LABELS, generator=gen) < 0.4).float()
    return images, ids, torch.ones_like(ids), labels


# ----------------------------------------------------------------------------------------- momentum
def test_momentum_update_arithmetic():
    online = TinyDualEncoder()
    expansion = BatchExpansion(online, queue_size=8, embed_dim=EMBED, num_labels=LABELS, momentum=0.9)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online.image[1].running_mean.add_(1.0)
        online.image[1].num_batches_tracked.fill_(17)
    before = {k: v.clone() for k, v in expansion.momentum_encoder.state_dict().items()}
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    expansion.momentum_update(online)
    after = expansion.momentum_encoder.state_dict()
    for name, value in online.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * value, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(after[name], value)
        assert torch.equal(online_before[name], value), "the online model must not change"
    assert all(not p.requires_grad for p in expansion.momentum_encoder.parameters())


def test_repeated_momentum_updates_converge_geometrically():
    online = TinyDualEncoder()
    expansion = BatchExpansion(online, queue_size=4, embed_dim=EMBED, num_labels=LABELS, momentum=0.8)
    start = expansion.momentum_encoder.image[0].weight.detach().clone()
    with torch.no_grad():
        online.image[0].weight.mul_(-3.0)
    for _ in range(5):
        expansion.momentum_update(online)
    want = 0.8**5 * start + (1 - 0.8**5) * online.image[0].weight.detach()
    torch.testing.assert_close(expansion.momentum_encoder.image[0].weight, want, rtol=1e-5, atol=1e-6)
    expansion.reset_momentum(online)
    assert torch.equal(expansion.momentum_encoder.image[0].weight, online.image[0].weight)


def test_momentum_encoder_stays_in_eval_mode_and_encodes_without_grad():
    gen = torch.Generator().manual_seed(0)
    online = TinyDualEncoder()
    expansion = BatchExpansion(online, queue_size=4, embed_dim=EMBED, num_labels=LABELS)
    expansion.train()
    assert not expansion.momentum_encoder.training
    images, ids, mask, _ = batch(gen, 5)
    first = expansion.encode(images, ids, mask)
    second = expansion.encode(images, ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), "eval mode: no dropout noise"
    assert not first[0].requires_grad and not first[1].requires_grad
    torch.testing.assert_close(first[0].norm(dim=1), torch.ones(5))
    with torch.no_grad():
        online.text[1].weight.add_(1.0)
    online.eval()
    assert not torch.allclose(online.encode_text(ids, mask), first[1])
    assert torch.equal(expansion.encode(images, ids, mask)[1], first[1]), "encode must use the momentum copy"
    expansion.momentum_update(online)
    assert not torch.equal(expansion.encode(images, ids, mask)[1], first[1])


def test_momentum_update_refuses_another_architecture():
    expansion = BatchExpansion(TinyDualEncoder(), queue_size=4, embed_dim=EMBED, num_labels=LABELS)
    with pytest.raises(ValueError, match="different model architecture"):
        expansion.momentum_update(nn.Linear(3, 3))


def test_ddp_wrapped_online_model_is_unwrapped():
    online = TinyDualEncoder()
    wrapper = nn.DataParallel(online)
    expansion = BatchExpansion(wrapper, queue_size=4, embed_dim=EMBED, num_labels=LABELS, momentum=0.5)
    expansion.momentum_update(wrapper)  # names match without the "module." prefix
    assert "module" not in dict(expansion.momentum_encoder.named_children())


# ----------------------------------------------------------------------------------------- queue
@pytest.mark.parametrize("queue_size", [7, 8, 1])
def test_enqueue_wraps_around_like_a_fifo(queue_size):
    gen = torch.Generator().manual_seed(queue_size)
    expansion = BatchExpansion(TinyDualEncoder(), queue_size=queue_size, embed_dim=EMBED, num_labels=LABELS)
    reference: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque(maxlen=queue_size)
    for n in [3, 3, 3, 2, 5, 9, 1, 4]:  # not a multiple of K, one batch larger than K
        image = F.normalize(torch.randn(n, EMBED, generator=gen), dim=1)
        text = F.normalize(torch.randn(n, EMBED, generator=gen), dim=1)
        labels = (torch.rand(n, LABELS, generator=gen) < 0.5).float()
        expansion.enqueue(image, text, labels)
        reference.extend(zip(image, text, labels, strict=True))
        got = expansion.queue_kwargs()
        newest_first = list(reversed(reference))
        filled = len(newest_first)
        assert got["queue_valid"].tolist() == [True] * filled + [False] * (queue_size - filled)
        assert int(expansion.queue_filled) == filled
        for slot, (img, txt, lab) in enumerate(newest_first):
            assert torch.equal(got["queue_image_features"][slot], img)
            assert torch.equal(got["queue_text_features"][slot], txt)
            assert torch.equal(got["queue_labels"][slot], lab)


def test_enqueue_refuses_wrong_shapes():
    expansion = BatchExpansion(TinyDualEncoder(), queue_size=4, embed_dim=EMBED, num_labels=LABELS)
    with pytest.raises(ValueError, match="features"):
        expansion.enqueue(torch.zeros(2, EMBED + 1), torch.zeros(2, EMBED + 1), torch.zeros(2, LABELS))
    with pytest.raises(ValueError, match="labels"):
        expansion.enqueue(torch.zeros(2, EMBED), torch.zeros(2, EMBED), torch.zeros(2, LABELS + 1))


def test_constructor_refuses_bad_settings():
    with pytest.raises(ValueError, match="queue_size"):
        BatchExpansion(TinyDualEncoder(), queue_size=0, embed_dim=EMBED, num_labels=LABELS)
    with pytest.raises(ValueError, match="momentum"):
        BatchExpansion(TinyDualEncoder(), queue_size=4, embed_dim=EMBED, num_labels=LABELS, momentum=1.5)


# ----------------------------------------------------------------------------------------- site state
def test_site_state_round_trips_through_a_weights_only_file(tmp_path: Path):
    gen = torch.Generator().manual_seed(3)
    online = TinyDualEncoder()
    expansion = BatchExpansion(online, queue_size=5, embed_dim=EMBED, num_labels=LABELS, momentum=0.7)
    for _ in range(3):
        images, ids, mask, labels = batch(gen, 3)
        with torch.no_grad():
            online.image[0].weight.add_(0.1)
        expansion.momentum_update(online)
        expansion.enqueue(*expansion.encode(images, ids, mask), labels)
    path = tmp_path / "site_state.pt"
    torch.save(expansion.site_state_dict(), path)

    restored = BatchExpansion(
        TinyDualEncoder(), queue_size=5, embed_dim=EMBED, num_labels=LABELS, momentum=0.7
    )
    restored.load_site_state_dict(torch.load(path, weights_only=True))
    for key, value in expansion.queue_kwargs().items():
        assert torch.equal(restored.queue_kwargs()[key], value)
    for (name, a), (_, b) in zip(
        expansion.momentum_encoder.state_dict().items(),
        restored.momentum_encoder.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert torch.equal(restored.queue_ptr, expansion.queue_ptr)


def test_site_state_from_another_configuration_is_refused():
    expansion = BatchExpansion(TinyDualEncoder(), queue_size=5, embed_dim=EMBED, num_labels=LABELS)
    other = BatchExpansion(TinyDualEncoder(), queue_size=6, embed_dim=EMBED, num_labels=LABELS)
    with pytest.raises(ValueError, match="queue size"):
        expansion.load_site_state_dict(other.site_state_dict())
    state = expansion.site_state_dict()
    state.pop("queue_ptr")
    with pytest.raises(ValueError, match="1 missing"):
        expansion.load_site_state_dict(state)


# ----------------------------------------------------------------------------------------- with the loss
def test_training_steps_refill_from_the_previous_batches():
    """The trainer's order: loss with the queue, step, momentum_update, encode, enqueue."""
    gen = torch.Generator().manual_seed(11)
    model = TinyDualEncoder()
    expansion = BatchExpansion(model, queue_size=16, embed_dim=EMBED, num_labels=LABELS)
    loss_fn = WSCLLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    refilled = []
    for _ in range(4):
        images, ids, mask, labels = batch(gen, 8)
        labels[1] = labels[0] = torch.tensor([1.0, 0.0, 0.0])  # guarantee a false negative
        out = loss_fn(**model(images, ids, mask), labels=labels, **expansion.queue_kwargs())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        expansion.momentum_update(model)
        expansion.enqueue(*expansion.encode(images, ids, mask), labels)
        refilled.append(float(loss_fn.last_stats["refilled"]))
        assert torch.isfinite(out["loss"])
    assert refilled[0] == 0.0, "the first step has an empty queue"
    assert all(r > 0 for r in refilled[1:])
    assert all(p.grad is None for p in expansion.momentum_encoder.parameters())


# ----------------------------------------------------------------------------------------- DDP (gloo)
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        expansion = BatchExpansion(TinyDualEncoder(), queue_size=11, embed_dim=EMBED, num_labels=LABELS)
        gen = torch.Generator().manual_seed(5)
        for step, sizes in enumerate([(3, 3), (4, 2), (3, 3), (1, 2)]):  # uneven last batches too
            total = sum(sizes)
            feats = F.normalize(torch.randn(total, 2 * EMBED, generator=gen), dim=1)
            labels = (torch.rand(total, LABELS, generator=gen) < 0.5).float()
            start = sum(sizes[:rank])
            part = slice(start, start + sizes[rank])
            expansion.enqueue(feats[part, :EMBED], feats[part, EMBED:], labels[part])
            gathered = concat_all_gather(labels[part])
            assert torch.equal(gathered, labels), f"step {step}: gather must concatenate in rank order"
        torch.save(
            {k: v for k, v in expansion.queue_kwargs().items()}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_the_single_process_queue(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = BatchExpansion(TinyDualEncoder(), queue_size=11, embed_dim=EMBED, num_labels=LABELS)
    gen = torch.Generator().manual_seed(5)
    for sizes in [(3, 3), (4, 2), (3, 3), (1, 2)]:
        total = sum(sizes)
        feats = F.normalize(torch.randn(total, 2 * EMBED, generator=gen), dim=1)
        labels = (torch.rand(total, LABELS, generator=gen) < 0.5).float()
        single.enqueue(feats[:, :EMBED], feats[:, EMBED:], labels)
    want = single.queue_kwargs()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in want.items():
            assert torch.equal(got[key], value), f"rank {rank} {key}"
