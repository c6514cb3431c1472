"""Batches for training: the collate function and a resumable, DDP-aware data order.

Data order is a pure function of (seed, epoch, position): each epoch is a seeded permutation cut
into *global* batches, and rank r takes the r-th contiguous slice of every global batch. So:
- a resumed run continues at exactly the batch it stopped at (only the position is saved);
- gathering the ranks' slices in rank order rebuilds the global batch a single process would see,
  which is what lets a 2-process DDP run reproduce the single-process queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vilref_fed.model.tokenizer import get_tokenizer


class PairCollator:
    """Dataset items {"image", "text", "labels"} -> one batch dict; tokenizes the texts.

    A class rather than a closure so DataLoader workers can pickle it; the tokenizer is rebuilt
    (cached) in each worker from its vocabulary name.
    """

    def __init__(self, vocab: str, context_length: int) -> None:
        self.vocab = vocab
        self.context_length = context_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = get_tokenizer(self.vocab, self.context_length)([item["text"] for item in items])
        return {
            "images": torch.stack([item["image"] for item in items]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.stack([torch.as_tensor(item["labels"], dtype=torch.float32) for item in items]),
        }


def collate_pairs(model: torch.nn.Module) -> PairCollator:
    """The collate function for `model` (its vocabulary and context length)."""
    from vilref_fed.model import unwrap

    cfg = unwrap(model).config
    return PairCollator(cfg.text.vocab, cfg.context_length)


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch of `dataset_len` items splits into global batches across `world` ranks."""

    dataset_len: int
    batch_size: int  # per rank
    world: int
    drop_last: bool
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def batches_per_epoch(self) -> int:
        n, g = self.dataset_len, self.global_batch
        full = n // g
        if full == 0:
            # Fewer items than one global batch: one smaller batch, split evenly over ranks.
            return 1 if n // self.world >= 2 else 0
        if not self.drop_last and (n - full * g) // self.world >= 2:
            return full + 1
        return full

    def epoch_batches(self, epoch: int, rank: int) -> list[list[int]]:
        """This rank's index lists for every batch of `epoch`, in order."""
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(self.dataset_len, generator=gen).tolist()
        out = []
        for b in range(self.batches_per_epoch()):
            chunk = perm[b * self.global_batch : (b + 1) * self.global_batch]
            per_rank = len(chunk) // self.world
            out.append(chunk[rank * per_rank : (rank + 1) * per_rank])
        return out


def check_item(item: Any, image_size: int, num_labels: int) -> None:
    """Fail early, with the fix, when a dataset does not follow the trainer's item contract."""
    if not isinstance(item, dict) or not {"image", "text", "labels"} <= set(item):
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"dataset items must be dicts with 'image', 'text' and 'labels' (got {keys})")
    image = item["image"]
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, image_size, image_size):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"dataset images must be float tensors [3, {image_size}, {image_size}] for this model "
            f"(got {shape}); build the dataset with the model config's image_size"
        )
    labels = torch.as_tensor(item["labels"])
    if labels.ndim != 1 or labels.numel() != num_labels:
        raise ValueError(
            f"dataset label vectors have {labels.numel()} entries, the train config says num_labels="
            f"{num_labels}; set num_labels to the ontology's label count"
        )
    if not isinstance(item["text"], str):
        raise ValueError("dataset item 'text' must be a string (the report)")
