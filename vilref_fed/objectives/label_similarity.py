"""Label similarity w_ij between multi-hot label vectors (DESIGN §4).

The similarity decides which pairs are false negatives and how hard the remaining negatives are
pushed, so it must be exact where it matters: two identical multi-hot vectors must give exactly
1.0 in floating point, or `w >= delta` with the default delta = 1 would silently miss them.
Writing the cosine as dot / sqrt(|a|^2 |b|^2) keeps every intermediate an exactly representable
integer for 0/1 vectors (and sqrt(n^2) is exactly n under IEEE rounding), so identical label sets
give 1.0 bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_labelled(labels: Tensor) -> Tensor:
    """Rows that carry at least one label; an all-zero row is "unlabelled" and never a false negative."""
    return labels.ne(0).any(dim=-1)


def label_similarity(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """Cosine similarity [A, K] between label rows, 0 where either row is empty.

    Empty rows get 0 rather than NaN because an unlabelled report tells us nothing: treating it as
    unrelated to everything means it is never removed as a false negative and is always a full
    negative. The diagonal w_ii = 1 of the WSCL notation is the caller's business (this function
    does not know which rows are "the same sample").
    """
    if labels_a.dim() != 2 or labels_b.dim() != 2 or labels_a.shape[1] != labels_b.shape[1]:
        raise ValueError(
            f"label_similarity needs two [N, L] label matrices with the same L; got "
            f"{tuple(labels_a.shape)} and {tuple(labels_b.shape)}"
        )
    dtype = torch.promote_types(labels_a.dtype, labels_b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    a = labels_a.to(dtype)
    b = labels_b.to(dtype)
    dot = a @ b.T
    sq_a = (a * a).sum(dim=1)
    sq_b = (b * b).sum(dim=1)
    # An empty row has dot = 0 with everything, so clamping its zero norm to the smallest normal
    # float gives 0 / tiny = 0 without a separate mask (and leaves every real norm untouched).
    denom = torch.sqrt(sq_a[:, None] * sq_b[None, :]).clamp_min_(torch.finfo(dtype).tiny)
    return (dot / denom).clamp_(-1.0, 1.0)
