"""The plain CLIP (symmetric InfoNCE) loss: the baseline every WSCL ablation is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _scaled_similarity(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """kappa * V T^T in float32 at least: at kappa = 100 half precision loses the ordering of logits."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be [B, D] with the same shape; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    return logit_scale * (image_features.to(dtype) @ text_features.to(dtype).T)


def clip_loss_terms(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """(L_i2t, L_t2i): cross-entropy of each image over the texts and of each text over the images."""
    logits = _scaled_similarity(image_features, text_features, logit_scale)
    return symmetric_cross_entropy(logits, logits.T)


def symmetric_cross_entropy(logits_i2t: Tensor, logits_t2i: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of row i against column i, in both directions (the positive of anchor i is column i).

    WSCL and CLIP both end here, with the transposed view built before either cross-entropy, so
    the two objectives share one autograd graph shape; that is what lets the delta > 1, gamma = 0,
    lam = 0 case match CLIP bit for bit (a different accumulation order would change the last bits
    of the logit-scale gradient).
    """
    targets = torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
    return F.cross_entropy(logits_i2t, targets), F.cross_entropy(logits_t2i, targets)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """½(L_i2t + L_t2i) over one batch of L2-normalised features; logit_scale is kappa, not log kappa."""
    loss_i2t, loss_t2i = clip_loss_terms(image_features, text_features, logit_scale)
    return 0.5 * (loss_i2t + loss_t2i)


class ClipLoss(nn.Module):
    """CLIP loss with the same call signature and output dict as `WSCLLoss`, so the trainer can swap them.

    Labels and queue arguments are accepted and ignored: the baseline uses neither, and taking them
    keeps `loss_fn(**model_out, labels=..., **expansion.queue_kwargs())` valid for both objectives.
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        labels: Tensor | None = None,
        queue_image_features: Tensor | None = None,
        queue_text_features: Tensor | None = None,
        queue_labels: Tensor | None = None,
        queue_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        loss_i2t, loss_t2i = clip_loss_terms(image_features, text_features, logit_scale)
        zero = torch.zeros((), dtype=loss_i2t.dtype, device=loss_i2t.device)
        return {
            "loss": 0.5 * (loss_i2t + loss_t2i),
            "loss_i2t": loss_i2t,
            "loss_t2i": loss_t2i,
            "loss_couple": zero,
        }
