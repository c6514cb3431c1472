"""Gathering queue entries across DDP ranks so that every rank holds the same memory queue.

MoCo's `concat_all_gather`, generalised to batches of unequal size (the last batch of an epoch):
sizes are exchanged first and each rank pads to the largest. Entries are concatenated in rank order,
so a single process that sees the concatenated global batch builds the identical queue.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def concat_all_gather(rows: Tensor) -> Tensor:
    """Concatenate [n_r, ...] tensors from every rank in rank order; identity without a process group.

    No gradient flows (queue entries never carry one), which is why a plain all_gather suffices.
    """
    world = distributed_world_size()
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    if rows.shape[0] < largest:
        pad = rows.new_zeros((largest - rows.shape[0], *rows.shape[1:]))
        rows = torch.cat([rows, pad], dim=0)
    gathered = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)], dim=0)
