"""torch.distributed helpers for DDP inside one hospital (several GPUs, or gloo on CPU in tests).

The contrastive loss needs every rank's features: each rank computes the loss over the *global*
batch. `gather_with_grad` concatenates all ranks' features in rank order while keeping this rank's
slice differentiable, so each rank back-propagates into its own encoders only. DDP then averages
gradients over ranks; scaling the loss by the world size turns that average back into the exact
single-process gradient of the global-batch loss.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped [n, ...] tensors from all ranks; gradients flow into the local slice."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); False if single.

    nccl on CUDA, gloo on CPU. Each rank uses the GPU given by LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()
