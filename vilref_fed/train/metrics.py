"""Image-text retrieval on a paired set: a cheap, label-free check that training is learning.

Used for local validation (numbers that may go on the wire: they are scalars) and by tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vilref_fed.model import unwrap
from vilref_fed.train.data import collate_pairs


@torch.no_grad()
def encode_dataset(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 64, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """L2-normalised image and text features [N, D] and labels [N, L] of a whole dataset, in order."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs(m))
    images, texts, labels = [], [], []
    try:
        for batch in loader:
            images.append(m.encode_image(batch["images"].to(device)).float().cpu())
            texts.append(
                m.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            )
            labels.append(batch["labels"])
    finally:
        m.train(was_training)
    return {"image": torch.cat(images), "text": torch.cat(texts), "labels": torch.cat(labels)}


def retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Recall@1/@5 of the paired item in both directions, and, given labels, label-match R@1
    (the top hit carries the same label set: fair when several reports say the same thing)."""
    sim = image @ text.T
    n = sim.shape[0]
    target = torch.arange(n)
    out: dict[str, Any] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        # rank of the true partner = number of candidates scoring strictly higher
        true = s[target, target]
        rank = (s > true[:, None]).sum(dim=1)
        out[f"{name}_r1"] = float((rank < 1).float().mean())
        out[f"{name}_r5"] = float((rank < 5).float().mean())
        if labels is not None:
            top = s.argmax(dim=1)
            out[f"{name}_label_r1"] = float((labels[top] == labels).all(dim=1).float().mean())
    return out
