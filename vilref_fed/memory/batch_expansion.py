"""The batch expansion module: momentum encoders + dynamic memory queues (DESIGN §4.2).

WSCL removes false negatives from each anchor's denominator; the queues hold recent momentum-encoder
features (and their label vectors) from earlier batches so that the loss can refill those vacancies
with true negatives. Habits follow MoCo: queues and pointer are registered buffers (they move with
`.to()` and save with the state dict), the momentum copy never receives gradients, and
`momentum_update` and `enqueue` are separate no-grad steps the trainer calls after the optimiser step.

Everything here is site state in federation: it never leaves the hospital.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vilref_fed.memory.distributed import concat_all_gather


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside DDP/DataParallel/torch.compile wrappers, so parameter names line up."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


class BatchExpansion(nn.Module):
    """Momentum copy of the online model plus FIFO queues of image features, text features and labels.

    The online module must offer `encode_image(images)` and `encode_text(input_ids, attention_mask)`
    returning L2-normalised features (ViLReFModel does); anything else is deep-copied as is.
    The momentum copy always runs in eval mode: queue features are targets, dropout noise would only
    add variance to them, and BatchNorm batch statistics would leak batch composition into the keys
    (the problem MoCo's shuffle-BN works around).
    """

    queue_image: Tensor
    queue_text: Tensor
    queue_labels: Tensor
    queue_ptr: Tensor
    queue_filled: Tensor

    def __init__(
        self, online: nn.Module, queue_size: int, embed_dim: int, num_labels: int, momentum: float = 0.995
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(
                f"queue_size must be >= 1 (got {queue_size}); use refill=False to run without a queue"
            )
        if embed_dim < 1 or num_labels < 1:
            raise ValueError(f"embed_dim and num_labels must be >= 1 (got {embed_dim}, {num_labels})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (got {momentum})")
        online = _unwrap(online)
        self.queue_size = int(queue_size)
        self.embed_dim = int(embed_dim)
        self.num_labels = int(num_labels)
        self.momentum = float(momentum)
        self.momentum_encoder = copy.deepcopy(online)
        self.momentum_encoder.requires_grad_(False)
        self.momentum_encoder.eval()
        device = next(iter(online.parameters()), torch.empty(0)).device
        self.register_buffer("queue_image", torch.zeros(queue_size, embed_dim, device=device))
        self.register_buffer("queue_text", torch.zeros(queue_size, embed_dim, device=device))
        self.register_buffer("queue_labels", torch.zeros(queue_size, num_labels, device=device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long, device=device))

    def train(self, mode: bool = True) -> BatchExpansion:
        """Switch mode for this module but keep the momentum encoder in eval mode (see class docstring)."""
        super().train(mode)
        self.momentum_encoder.eval()
        return self

    def _pairs(self, online: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Matching (momentum, online) parameter and buffer lists, checked by name and shape."""
        online = _unwrap(online)
        params_k, params_q, bufs_k, bufs_q = [], [], [], []
        for kind, ours, theirs in (
            ("parameter", self.momentum_encoder.named_parameters(), online.named_parameters()),
            ("buffer", self.momentum_encoder.named_buffers(), online.named_buffers()),
        ):
            ours, theirs = list(ours), list(theirs)
            if [n for n, _ in ours] != [n for n, _ in theirs] or any(
                a.shape != b.shape for (_, a), (_, b) in zip(ours, theirs, strict=True)
            ):
                raise ValueError(
                    f"the online model's {kind}s do not match the momentum copy's: BatchExpansion was built "
                    "for a different model architecture"
                )
            target_k, target_q = (params_k, params_q) if kind == "parameter" else (bufs_k, bufs_q)
            target_k.extend(t for _, t in ours)
            target_q.extend(t.detach() for _, t in theirs)
        return params_k, params_q, bufs_k, bufs_q

    @torch.no_grad()
    def _ema(self, online: nn.Module, momentum: float) -> None:
        params_k, params_q, bufs_k, bufs_q = self._pairs(online)
        if params_k:
            torch._foreach_mul_(params_k, momentum)
            torch._foreach_add_(params_k, params_q, alpha=1.0 - momentum)
        for buf_k, buf_q in zip(bufs_k, bufs_q, strict=True):
            if buf_k.is_floating_point():
                buf_k.mul_(momentum).add_(buf_q, alpha=1.0 - momentum)
            else:
                buf_k.copy_(buf_q)

    @torch.no_grad()
    def momentum_update(self, online: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (and floating-point buffer).

        Floating buffers (BatchNorm statistics) follow the same average because the eval-mode copy
        never updates its own; integer buffers (counters, position ids) are copied.
        """
        self._ema(online, self.momentum)

    @torch.no_grad()
    def reset_momentum(self, online: nn.Module) -> None:
        """Copy the online weights exactly (m = 0), e.g. when a site starts from received global weights."""
        self._ema(online, 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(image_feats, text_feats) from the momentum encoders: the entries the next enqueue stores."""
        encoder = self.momentum_encoder
        if not (hasattr(encoder, "encode_image") and hasattr(encoder, "encode_text")):
            raise TypeError(
                f"{type(encoder).__name__} has no encode_image/encode_text; BatchExpansion.encode needs a "
                "dual encoder such as ViLReFModel"
            )
        return encoder.encode_image(images), encoder.encode_text(input_ids, attention_mask)

    @torch.no_grad()
    def enqueue(self, image_feats: Tensor, text_feats: Tensor, labels: Tensor) -> None:
        """Append a batch FIFO, overwriting the oldest entries and wrapping around the end of the buffer.

        Under torch.distributed the batch is first gathered from all ranks (rank order), so every rank
        holds the same queue. Position arithmetic stays on the device: no host sync per step.
        """
        n = image_feats.shape[0]
        if image_feats.shape != (n, self.embed_dim) or text_feats.shape != (n, self.embed_dim):
            raise ValueError(
                f"enqueue needs [B, {self.embed_dim}] image and text features; got "
                f"{tuple(image_feats.shape)} and {tuple(text_feats.shape)}"
            )
        if labels.shape != (n, self.num_labels):
            raise ValueError(f"enqueue needs [B, {self.num_labels}] labels; got {tuple(labels.shape)}")
        dtype = self.queue_image.dtype
        rows = torch.cat([image_feats.to(dtype), text_feats.to(dtype), labels.to(dtype)], dim=1)
        rows = concat_all_gather(rows)
        size = self.queue_size
        if rows.shape[0] > size:
            rows = rows[-size:]
        n = rows.shape[0]
        if n == 0:
            return
        index = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        d = self.embed_dim
        self.queue_image.index_copy_(0, index, rows[:, :d])
        self.queue_text.index_copy_(0, index, rows[:, d : 2 * d])
        self.queue_labels.index_copy_(0, index, rows[:, 2 * d :])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=size))

    def recency_order(self) -> Tensor:
        """Buffer indices from the newest entry to the oldest (the newest sits just before the pointer)."""
        steps = torch.arange(self.queue_size, device=self.queue_ptr.device)
        return (self.queue_ptr - 1 - steps) % self.queue_size

    def queue_valid(self) -> Tensor:
        """[K] bool in recency order: True for slots that have been written (a new queue is partly empty)."""
        return torch.arange(self.queue_size, device=self.queue_filled.device) < self.queue_filled

    @torch.no_grad()
    def queue_kwargs(self) -> dict[str, Tensor]:
        """The queue as WSCLLoss keyword arguments, ordered most-recent-first, with the validity mask."""
        order = self.recency_order()
        return {
            "queue_image_features": self.queue_image.index_select(0, order),
            "queue_text_features": self.queue_text.index_select(0, order),
            "queue_labels": self.queue_labels.index_select(0, order),
            "queue_valid": self.queue_valid(),
        }

    @torch.no_grad()
    def reset_queue(self) -> None:
        """Empty the queues (e.g. after a label-policy change made the stored label vectors stale)."""
        self.queue_image.zero_()
        self.queue_text.zero_()
        self.queue_labels.zero_()
        self.queue_ptr.zero_()
        self.queue_filled.zero_()

    def site_state_dict(self) -> dict[str, Tensor]:
        """Momentum weights + queues (detached copies): the site state saved between rounds, never sent."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()}

    def load_site_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `site_state_dict()` output, refusing state saved for another model or queue shape."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise ValueError(
                f"site state does not match this model ({len(missing)} missing, {len(unexpected)} unexpected "
                f"entries, e.g. {example!r}); it was saved for another model configuration: remove the "
                "site's training state directory to start the momentum encoders and queues afresh"
            )
        for name, value in expected.items():
            if tuple(state[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"site state entry {name!r} has shape {tuple(state[name].shape)} but this run expects "
                    f"{tuple(value.shape)} (queue size, embedding width or label count changed); remove the "
                    "site's training state directory or restore the previous settings"
                )
        self.load_state_dict(state, strict=True)
