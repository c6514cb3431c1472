"""Weighted Similarity Coupling Loss with false-negative removal and queue refill (DESIGN §4).

Our formulation (the paper's equations could not be checked; docs/architecture.md "Objective"):

- w_ij = cos(y_i, y_j), 0 when either label vector is empty.
- False negatives F_i = {j != i : w_ij >= delta} leave anchor i's denominator (logit -> -inf).
- Batch expansion: the |F_i| vacancies are refilled with the most recent queue entries k whose
  labels satisfy w(y_i, Q_y[k]) < delta (image anchors draw from the text queue, text anchors from
  the image queue); queue entries carry no gradient.
- Every remaining negative is weighted by alpha = (1 - w)^gamma, applied in log space
  (logit + gamma * log(1 - w)) so that the whole row is one cross-entropy and stays stable at kappa = 100.
- L = ½(L_i2t + L_t2i) + lam * mean_{i != j}(s_ij - w_ij)^2.

Float tolerance: a pair is a false negative when w >= delta * (1 - FN_TOLERANCE), a relative
tolerance of 1e-6 (relative so that a tiny delta never turns w = 0 pairs into matches). Identical 0/1
label vectors already give exactly 1.0 (see label_similarity), the tolerance catches soft or scaled
label vectors whose cosine rounds to 0.99999994. The closest distinct multi-hot pair over 19 labels
has cosine sqrt(18/19) ~ 0.973, far outside it. delta > 1 switches removal (and so refill) off
entirely, which is what makes delta > 1, gamma = 0, lam = 0 bit-identical to the CLIP loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vilref_fed.objectives.clip import symmetric_cross_entropy
from vilref_fed.objectives.label_similarity import label_similarity

FN_TOLERANCE = 1e-6


def removal_enabled(delta: float) -> bool:
    """Whether any pair can be a false negative: cosine never exceeds 1, so delta > 1 removes nothing."""
    return delta <= 1.0


def false_negative_threshold(delta: float) -> float:
    """The label cosine from which a pair counts as a false negative (delta less a relative 1e-6)."""
    if not delta > 0:
        raise ValueError(
            f"delta must be > 0 (got {delta}): at delta <= 0 every pair would be a false negative"
        )
    return delta * (1.0 - FN_TOLERANCE)


def false_negative_mask(similarity: Tensor, delta: float) -> Tensor:
    """[A, K] bool: pairs whose label similarity reaches delta. The diagonal is the caller's concern.

    Unlabelled rows never qualify without a separate mask: their similarity is 0 with everything
    and the threshold is > 0 (delta > 0 is enforced), so an unknown report never matches anything.
    """
    if not removal_enabled(delta):
        return torch.zeros(similarity.shape, dtype=torch.bool, device=similarity.device)
    return similarity >= false_negative_threshold(delta)


def refill_selection(
    queue_similarity: Tensor, vacancies: Tensor, delta: float, queue_valid: Tensor | None = None
) -> Tensor:
    """[B, K] bool: for each anchor, its `vacancies[i]` most recent eligible queue entries.

    queue_similarity[i, k] = w(y_i, Q_y[k]) with the queue ordered most-recent-first, so "the n most
    recent entries with w < delta" is a prefix count: eligible & (running count of eligible <= n).
    One cumsum over [B, K] replaces a per-anchor top-k, needs no host sync, and takes fewer entries
    only when fewer are eligible. Unlabelled queue entries (w = 0) are always eligible.
    """
    if removal_enabled(delta):
        eligible = queue_similarity < false_negative_threshold(delta)
    else:
        eligible = torch.ones(queue_similarity.shape, dtype=torch.bool, device=queue_similarity.device)
    if queue_valid is not None:
        eligible &= queue_valid[None, :]
    return eligible & (eligible.cumsum(dim=1) <= vacancies[:, None])


def _log_alpha(similarity: Tensor, gamma: float) -> Tensor | None:
    """log (1 - w)^gamma, or None for gamma = 0 (alpha = 1 everywhere, 0^0 = 1 included)."""
    if gamma == 0:
        return None
    return gamma * torch.log1p(-similarity.clamp(0.0, 1.0))


def wscl_from_similarity(
    similarity: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor,
    *,
    delta: float = 1.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    refill: bool = True,
    queue_similarity_i2t: Tensor | None = None,
    queue_similarity_t2i: Tensor | None = None,
    queue_labels: Tensor | None = None,
    queue_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """WSCL from the raw cosine matrices, so tests can differentiate with respect to each s_ij.

    similarity[i, j] = v_i . t_j (not scaled); queue_similarity_i2t[i, k] = v_i . Q_t[k] and
    queue_similarity_t2i[i, k] = t_i . Q_v[k], queue ordered most-recent-first.
    """
    batch = similarity.shape[0]
    if similarity.dim() != 2 or similarity.shape[1] != batch or batch == 0:
        raise ValueError(
            f"similarity must be a non-empty square [B, B] matrix; got {tuple(similarity.shape)}"
        )
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [B, L] with B = {batch}; got {tuple(labels.shape)}")
    device = similarity.device
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    labels = labels.to(similarity.dtype)
    w = label_similarity(labels, labels).masked_fill(eye, 1.0)
    false_neg = false_negative_mask(w, delta) & ~eye

    bias = _log_alpha(w, gamma)
    if bias is not None:
        bias = bias.masked_fill(eye, 0.0)
    if removal_enabled(delta):
        bias = (bias if bias is not None else torch.zeros_like(w)).masked_fill(false_neg, float("-inf"))

    logits_i2t = logit_scale * similarity
    logits_t2i = logits_i2t.T
    if bias is not None:
        logits_i2t = logits_i2t + bias
        logits_t2i = logits_t2i + bias.T

    vacancies = false_neg.sum(dim=1)
    refilled = torch.zeros_like(vacancies)
    use_queue = refill and removal_enabled(delta) and queue_similarity_i2t is not None
    if use_queue:
        if queue_similarity_t2i is None or queue_labels is None:
            raise ValueError("queue refill needs queue similarities in both directions and queue_labels")
        w_queue = label_similarity(labels, queue_labels.to(similarity.dtype))
        selected = refill_selection(w_queue, vacancies, delta, queue_valid)
        refilled = selected.sum(dim=1)
        queue_bias = _log_alpha(w_queue, gamma)
        queue_bias = torch.where(selected, 0.0 if queue_bias is None else queue_bias, float("-inf"))
        logits_i2t = torch.cat([logits_i2t, logit_scale * queue_similarity_i2t + queue_bias], dim=1)
        logits_t2i = torch.cat([logits_t2i, logit_scale * queue_similarity_t2i + queue_bias], dim=1)

    loss_i2t, loss_t2i = symmetric_cross_entropy(logits_i2t, logits_t2i)

    coupled = similarity if lam != 0 else similarity.detach()
    if batch > 1:
        loss_couple = (coupled - w)[~eye].pow(2).mean()
    else:
        loss_couple = coupled.sum() * 0.0
    loss = 0.5 * (loss_i2t + loss_t2i)
    if lam != 0:
        loss = loss + lam * loss_couple
    return {
        "loss": loss,
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "loss_couple": loss_couple,
        "false_negatives": vacancies.to(similarity.dtype).mean().detach(),
        "refilled": refilled.to(similarity.dtype).mean().detach(),
    }


def _check_queue(
    dim: int,
    num_labels: int,
    queue_image_features: Tensor | None,
    queue_text_features: Tensor | None,
    queue_labels: Tensor | None,
    queue_valid: Tensor | None,
) -> bool:
    """Whether a complete, consistent queue was passed (all three tensors, or none of them)."""
    given = [t is not None for t in (queue_image_features, queue_text_features, queue_labels)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError(
            "pass queue_image_features, queue_text_features and queue_labels together "
            "(BatchExpansion.queue_kwargs() gives all of them)"
        )
    size = queue_labels.shape[0]
    if queue_image_features.shape != (size, dim) or queue_text_features.shape != (size, dim):
        raise ValueError(
            f"queue features must be [K, {dim}] with K = {size} (from queue_labels); got "
            f"{tuple(queue_image_features.shape)} and {tuple(queue_text_features.shape)}"
        )
    if queue_labels.dim() != 2 or queue_labels.shape[1] != num_labels:
        raise ValueError(f"queue_labels must be [K, {num_labels}]; got {tuple(queue_labels.shape)}")
    if queue_valid is not None and (queue_valid.shape != (size,) or queue_valid.dtype != torch.bool):
        raise ValueError(
            f"queue_valid must be a bool tensor of shape [{size}]; got {queue_valid.dtype} "
            f"{tuple(queue_valid.shape)}"
        )
    return True


class WSCLLoss(nn.Module):
    """WSCL with every term a switch, so each ablation is one argument.

    delta: false-negative threshold on label cosine (1.0 = identical label sets; > 1 removes nothing).
    gamma: exponent of the negative weight alpha = (1 - w)^gamma (0 = unweighted).
    lam: weight of the similarity-coupling term (0 = off).
    refill: fill removed false negatives from the memory queue (needs the queue kwargs).
    """

    def __init__(self, delta: float = 1.0, gamma: float = 1.0, lam: float = 1.0, refill: bool = True) -> None:
        super().__init__()
        false_negative_threshold(delta)  # refuses delta <= 0
        if gamma < 0:
            raise ValueError(
                f"gamma must be >= 0 (got {gamma}): a negative exponent would push similar pairs harder"
            )
        if lam < 0:
            raise ValueError(f"lam must be >= 0 (got {lam})")
        self.delta = float(delta)
        self.gamma = float(gamma)
        self.lam = float(lam)
        self.refill = bool(refill)
        self.last_stats: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return f"delta={self.delta}, gamma={self.gamma}, lam={self.lam}, refill={self.refill}"

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        labels: Tensor,
        queue_image_features: Tensor | None = None,
        queue_text_features: Tensor | None = None,
        queue_labels: Tensor | None = None,
        queue_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Scalar losses {loss, loss_i2t, loss_t2i, loss_couple} for one batch of L2-normalised features.

        After the call, `last_stats` holds detached diagnostics (mean false negatives and mean refilled
        entries per anchor) without forcing a device sync.
        """
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must both be [B, D] with the same shape; got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if labels is None or labels.dim() != 2 or labels.shape[0] != image_features.shape[0]:
            shape = None if labels is None else tuple(labels.shape)
            raise ValueError(
                f"labels must be a [B, L] multi-hot tensor with B = {image_features.shape[0]}; got {shape}"
            )
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        image = image_features.to(dtype)
        text = text_features.to(dtype)
        similarity = image @ text.T
        has_queue = _check_queue(
            image.shape[1],
            labels.shape[1],
            queue_image_features,
            queue_text_features,
            queue_labels,
            queue_valid,
        )
        queue_kwargs: dict[str, Tensor | None] = {}
        if has_queue and self.refill and removal_enabled(self.delta):
            queue_kwargs = {
                "queue_similarity_i2t": image @ queue_text_features.detach().to(dtype).T,
                "queue_similarity_t2i": text @ queue_image_features.detach().to(dtype).T,
                "queue_labels": queue_labels.detach(),
                "queue_valid": queue_valid,
            }
        out = wscl_from_similarity(
            similarity,
            logit_scale,
            labels,
            delta=self.delta,
            gamma=self.gamma,
            lam=self.lam,
            refill=self.refill,
            **queue_kwargs,
        )
        self.last_stats = {"false_negatives": out.pop("false_negatives"), "refilled": out.pop("refilled")}
        return out
