"""WSCL, label similarity and the CLIP loss against slow loop-based references (DESIGN §4).

The references below loop over anchors in plain Python, in float64, with direct exponentials (safe
in float64 up to kappa = 100) and no masking tricks: each is a line-by-line reading of the equations,
so agreement in value AND gradient checks the vectorised masking, cumsum refill and log-space weights.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from vilref_fed.objectives import (
    FN_TOLERANCE,
    ClipLoss,
    WSCLLoss,
    clip_loss,
    label_similarity,
    refill_selection,
    wscl_from_similarity,
)
from vilref_fed.objectives.label_similarity import is_labelled
from vilref_fed.objectives.wscl import false_negative_mask

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- references
def ref_cos(a: list[float], b: list[float]) -> float:
    na = sum(x * x for x in a)
    nb = sum(x * x for x in b)
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(na * nb)


def ref_is_false_negative(a: list[float], b: list[float], delta: float) -> bool:
    if delta > 1 or not any(a) or not any(b):
        return False
    return ref_cos(a, b) >= delta * (1 - FN_TOLERANCE)


def ref_refill(y_i: list[float], n_vacancies: int, queue_labels: list[list[float]], valid: list[bool], delta):
    """Indices of the n most recent (lowest index: most-recent-first) valid entries not similar to y_i."""
    taken: list[int] = []
    for k, y_k in enumerate(queue_labels):
        if len(taken) == n_vacancies:
            break
        if valid[k] and not ref_is_false_negative(y_i, y_k, delta):
            taken.append(k)
    return taken


def ref_direction(anchors, others, queue_others, kappa, labels, queue_labels, valid, delta, gamma, refill):
    """−1/B Σ_i log(e^{κ s_ii} / (e^{κ s_ii} + Σ_{j∈N_i} α_ij e^{κ s_ij})) with one anchor modality."""
    batch = len(labels)
    total = anchors.new_zeros(())
    for i in range(batch):
        positive = torch.exp(kappa * torch.dot(anchors[i], others[i]))
        denominator = positive
        false_negatives = [
            j for j in range(batch) if j != i and ref_is_false_negative(labels[i], labels[j], delta)
        ]
        for j in range(batch):
            if j == i or j in false_negatives:
                continue
            alpha = (1.0 - min(ref_cos(labels[i], labels[j]), 1.0)) ** gamma
            denominator = denominator + alpha * torch.exp(kappa * torch.dot(anchors[i], others[j]))
        if refill and queue_others is not None:
            for k in ref_refill(labels[i], len(false_negatives), queue_labels, valid, delta):
                alpha = (1.0 - min(ref_cos(labels[i], queue_labels[k]), 1.0)) ** gamma
                denominator = denominator + alpha * torch.exp(kappa * torch.dot(anchors[i], queue_others[k]))
        total = total - torch.log(positive / denominator)
    return total / batch


def ref_wscl(v, t, kappa, labels, queue_v, queue_t, queue_labels, valid, delta, gamma, lam, refill):
    batch = v.shape[0]
    lab = labels.tolist()
    qlab = queue_labels.tolist() if queue_labels is not None else []
    val = valid.tolist() if valid is not None else [True] * len(qlab)
    loss_i2t = ref_direction(v, t, queue_t, kappa, lab, qlab, val, delta, gamma, refill)
    loss_t2i = ref_direction(t, v, queue_v, kappa, lab, qlab, val, delta, gamma, refill)
    couple = v.new_zeros(())
    for i in range(batch):
        for j in range(batch):
            if i != j:
                couple = couple + (torch.dot(v[i], t[j]) - ref_cos(lab[i], lab[j])) ** 2
    couple = couple / max(batch * (batch - 1), 1)
    return 0.5 * (loss_i2t + loss_t2i) + lam * couple, loss_i2t, loss_t2i, couple


def ref_clip(v, t, kappa):
    batch = v.shape[0]
    total = v.new_zeros(())
    for i in range(batch):
        row = [torch.exp(kappa * torch.dot(v[i], t[j])) for j in range(batch)]
        col = [torch.exp(kappa * torch.dot(v[j], t[i])) for j in range(batch)]
        total = total - torch.log(row[i] / sum(row)) - torch.log(col[i] / sum(col))
    return total / (2 * batch)


# ----------------------------------------------------------------------------------------- inputs
def random_labels(gen: torch.Generator, n: int, num_labels: int, p_empty: float) -> torch.Tensor:
    """Few labels so identical label sets (false negatives) are common; some rows deliberately empty."""
    labels = (torch.rand(n, num_labels, generator=gen) < 0.35).double()
    empty = torch.rand(n, generator=gen) < p_empty
    labels[empty] = 0.0
    return labels


def random_case(seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = rng.choice([1, 3, 6, 8, 10, 12])
    dim, num_labels = 6, rng.choice([2, 3, 3, 4])
    queue = rng.choice([0, 1, 4, 9, 16, 16])
    v = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    t = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    kappa = torch.tensor(rng.choice([1.0, 1 / 0.07, 100.0]), dtype=torch.float64, requires_grad=True)
    labels = random_labels(gen, batch, num_labels, p_empty=0.25)
    qv = F.normalize(torch.randn(queue, dim, generator=gen, dtype=torch.float64), dim=1)
    qt = F.normalize(torch.randn(queue, dim, generator=gen, dtype=torch.float64), dim=1)
    qy = random_labels(gen, queue, num_labels, p_empty=0.2)
    filled = rng.randint(queue // 3, queue)
    valid = torch.arange(queue) < filled
    hyper = {
        "delta": rng.choice([1.0, 1.0, 0.7, 0.5, 1.2]),
        "gamma": rng.choice([0.0, 1.0, 2.5]),
        "lam": rng.choice([0.0, 1.0, 0.3]),
        "refill": rng.choice([True, True, True, False]),
    }
    return v, t, kappa, labels, qv, qt, qy, valid, hyper


# ----------------------------------------------------------------------------------------- label similarity
def test_label_similarity_matches_reference_with_empty_rows():
    gen = torch.Generator().manual_seed(1)
    a = random_labels(gen, 12, 5, p_empty=0.3).float()
    b = random_labels(gen, 9, 5, p_empty=0.3).float()
    got = label_similarity(a, b)
    want = torch.tensor([[ref_cos(x, y) for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(got, want)
    assert torch.all(got[~is_labelled(a)] == 0) and torch.all(got[:, ~is_labelled(b)] == 0)


def test_identical_multi_hot_vectors_give_exactly_one():
    gen = torch.Generator().manual_seed(2)
    labels = (torch.rand(200, 19, generator=gen) < 0.4).float()
    labels[labels.sum(1) == 0, 0] = 1.0
    w = label_similarity(labels, labels)
    assert torch.all(torch.diagonal(w) == 1.0)  # exact, not approximately: delta = 1 must catch them


def test_label_similarity_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="same L"):
        label_similarity(torch.ones(2, 3), torch.ones(2, 4))


# ----------------------------------------------------------------------------------------- CLIP loss
@pytest.mark.parametrize("seed", range(5))
def test_clip_loss_matches_loop_reference(seed):
    v, t, kappa, *_ = random_case(seed)
    got = clip_loss(v, t, kappa)
    want = ref_clip(v, t, kappa)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, (v, t, kappa))
    want_grads = torch.autograd.grad(want, (v, t, kappa))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------------------- WSCL vs reference
@pytest.mark.parametrize("seed", range(80))
def test_wscl_value_and_gradients_match_loop_reference(seed):
    v, t, kappa, labels, qv, qt, qy, valid, hyper = random_case(seed)
    loss_fn = WSCLLoss(**hyper)
    has_queue = qv.shape[0] > 0 or seed % 2 == 0  # K = 0 queues are passed too, sometimes
    queue = {"queue_image_features": qv, "queue_text_features": qt, "queue_labels": qy, "queue_valid": valid}
    out = loss_fn(v, t, kappa, labels, **(queue if has_queue else {}))
    want, want_i2t, want_t2i, want_couple = ref_wscl(
        v,
        t,
        kappa,
        labels,
        qv if has_queue else None,
        qt if has_queue else None,
        qy if has_queue else None,
        valid if has_queue else None,
        **hyper,
    )
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["loss_i2t"], want_i2t)
    torch.testing.assert_close(out["loss_t2i"], want_t2i)
    torch.testing.assert_close(out["loss_couple"], want_couple.detach())
    grads = torch.autograd.grad(out["loss"], (v, t, kappa))
    want_grads = torch.autograd.grad(want, (v, t, kappa))
    for name, g, w in zip(("image", "text", "kappa"), grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name} gradient: {m}")


def test_reference_cases_cover_refill_and_empty_labels():
    """Guard for the test above: the seeds really exercise refills, FN removal and empty label rows."""
    refills = removals = empties = 0
    for seed in range(80):
        v, t, kappa, labels, qv, qt, qy, valid, hyper = random_case(seed)
        loss_fn = WSCLLoss(**hyper)
        loss_fn(v, t, kappa, labels, qv, qt, qy, valid)
        refills += float(loss_fn.last_stats["refilled"]) > 0
        removals += float(loss_fn.last_stats["false_negatives"]) > 0
        empties += bool((~is_labelled(labels)).any())
    assert refills >= 15 and removals >= 30 and empties >= 30


# ----------------------------------------------------------------------------------------- reduction to CLIP
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("delta", [1.0 + 1e-3, 2.0])
def test_reduces_exactly_to_clip_when_delta_above_one_gamma_zero_lambda_zero(seed, delta):
    v, t, kappa, labels, qv, qt, qy, valid, _ = random_case(seed)
    v32, t32 = v.detach().float().requires_grad_(), t.detach().float().requires_grad_()
    k32 = kappa.detach().float().requires_grad_()
    labels = labels.clone()
    labels[-1] = labels[0]  # a duplicate label set that delta = 1 would remove
    out = WSCLLoss(delta=delta, gamma=0.0, lam=0.0, refill=True)(v32, t32, k32, labels, qv, qt, qy, valid)
    wscl_grads = torch.autograd.grad(out["loss"], (v32, t32, k32))
    clip = clip_loss(v32, t32, k32)
    clip_grads = torch.autograd.grad(clip, (v32, t32, k32))
    assert torch.equal(out["loss"], clip)
    for g, c in zip(wscl_grads, clip_grads, strict=True):
        assert torch.equal(g, c)
    assert torch.equal(ClipLoss()(v32, t32, k32, labels)["loss"], clip)


# ----------------------------------------------------------------------------------------- false negatives
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_false_negative_never_reaches_a_denominator(seed, gamma, lam):
    gen = torch.Generator().manual_seed(100 + seed)
    batch, num_labels = 8, 3
    labels = random_labels(gen, batch, num_labels, p_empty=0.2)
    labels[1] = labels[0] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    v = F.normalize(torch.randn(batch, 5, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(batch, 5, generator=gen, dtype=torch.float64), dim=1)
    sim = (v @ t.T).requires_grad_()
    out = wscl_from_similarity(sim, 30.0, labels, delta=1.0, gamma=gamma, lam=lam, refill=False)
    contrastive = out["loss_i2t"] + out["loss_t2i"]
    (grad,) = torch.autograd.grad(contrastive, sim)
    w = label_similarity(labels, labels)
    eye = torch.eye(batch, dtype=torch.bool)
    fn = false_negative_mask(w, 1.0) & ~eye
    assert fn[0, 1] and fn[1, 0]
    assert torch.all(grad[fn] == 0), "d loss / d s_ij must be exactly 0 for every false negative j of i"
    keeps_weight = ~fn & ~eye & ((1 - w) > 0 if gamma > 0 else torch.ones_like(fn))
    assert torch.all(grad[keeps_weight] != 0), "every true negative with alpha > 0 must contribute"
    # and moving a false negative's similarity changes nothing in the contrastive terms
    bumped = sim.detach().clone()
    bumped[fn] = 1.0
    again = wscl_from_similarity(bumped, 30.0, labels, delta=1.0, gamma=gamma, lam=lam, refill=False)
    torch.testing.assert_close(
        again["loss_i2t"] + again["loss_t2i"], contrastive.detach(), rtol=0, atol=1e-12
    )


def test_empty_label_rows_never_make_false_negatives_even_at_tiny_delta():
    labels = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    w = label_similarity(labels, labels)
    fn = false_negative_mask(w, 1e-9) & ~torch.eye(5, dtype=torch.bool)
    assert not fn[0].any() and not fn[1].any() and not fn[:, 0].any() and not fn[:, 1].any()
    assert fn[2, 3] and fn[3, 2] and not fn[2, 4]


def test_delta_one_uses_a_small_tolerance_for_float_cosines():
    soft = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.6, 0.9], [0.1, 0.2, 0.0]], dtype=torch.float32)
    w = label_similarity(soft, soft)
    fn = false_negative_mask(w, 1.0)
    assert fn[0, 1] and fn[1, 0]  # parallel soft labels: cosine 1 up to float rounding
    assert not fn[0, 2]
    assert not false_negative_mask(w, 1.0 + 2 * FN_TOLERANCE).any()  # delta > 1 removes nothing


# ----------------------------------------------------------------------------------------- refill
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("delta", [1.0, 0.6])
def test_refill_takes_most_recent_dissimilar_entries_and_restores_b_minus_1(seed, delta):
    gen = torch.Generator().manual_seed(200 + seed)
    batch, queue, num_labels = 10, 40, 3
    labels = random_labels(gen, batch, num_labels, p_empty=0.15)
    queue_labels = random_labels(gen, queue, num_labels, p_empty=0.15)
    valid = torch.arange(queue) < int(torch.randint(queue // 2, queue + 1, (1,), generator=gen))
    fn = false_negative_mask(label_similarity(labels, labels), delta) & ~torch.eye(batch, dtype=torch.bool)
    vacancies = fn.sum(1)
    selected = refill_selection(label_similarity(labels, queue_labels), vacancies, delta, valid)
    for i in range(batch):
        y_i = labels[i].tolist()
        chosen = selected[i].nonzero().flatten().tolist()
        want = ref_refill(y_i, int(vacancies[i]), queue_labels.tolist(), valid.tolist(), delta)
        assert chosen == want  # the most recent eligible entries, in recency order
        for k in chosen:
            assert valid[k]
            assert ref_cos(y_i, queue_labels[k].tolist()) < delta * (1 - FN_TOLERANCE) or not any(y_i)
            if delta == 1.0:
                assert not torch.equal(queue_labels[k], labels[i]), (
                    "a refilled entry shares the anchor's labels"
                )
        eligible = sum(
            1
            for k in range(queue)
            if valid[k] and not ref_is_false_negative(y_i, queue_labels[k].tolist(), delta)
        )
        negatives = (batch - 1 - int(vacancies[i])) + len(chosen)
        if eligible >= vacancies[i]:
            assert negatives == batch - 1
        else:
            assert len(chosen) == eligible


def test_refilled_queue_entries_receive_gradient_exactly_where_selected():
    gen = torch.Generator().manual_seed(7)
    batch, queue = 6, 12
    labels = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=torch.float64)
    queue_labels = random_labels(gen, queue, 2, p_empty=0.2)
    v = F.normalize(torch.randn(batch, 4, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(batch, 4, generator=gen, dtype=torch.float64), dim=1)
    qv = F.normalize(torch.randn(queue, 4, generator=gen, dtype=torch.float64), dim=1)
    qt = F.normalize(torch.randn(queue, 4, generator=gen, dtype=torch.float64), dim=1)
    q_i2t = (v @ qt.T).requires_grad_()
    q_t2i = (t @ qv.T).requires_grad_()
    valid = torch.ones(queue, dtype=torch.bool)
    out = wscl_from_similarity(
        v @ t.T,
        10.0,
        labels,
        gamma=0.0,
        lam=0.0,
        queue_similarity_i2t=q_i2t,
        queue_similarity_t2i=q_t2i,
        queue_labels=queue_labels,
        queue_valid=valid,
    )
    g_i2t, g_t2i = torch.autograd.grad(out["loss"], (q_i2t, q_t2i))
    fn = false_negative_mask(label_similarity(labels, labels), 1.0) & ~torch.eye(batch, dtype=torch.bool)
    selected = refill_selection(label_similarity(labels, queue_labels), fn.sum(1), 1.0, valid)
    assert selected.any()
    assert torch.equal(g_i2t != 0, selected) and torch.equal(g_t2i != 0, selected)
    assert not selected[5].any(), "an unlabelled anchor has no vacancy to refill"


def test_refill_off_empty_queue_and_invalid_queue_all_equal_no_queue():
    v, t, kappa, labels, qv, qt, qy, _, _ = random_case(3)
    labels = labels.clone()
    labels[:] = 0
    labels[:, 0] = 1  # everybody shares a label set: maximal removal
    base = WSCLLoss()(v, t, kappa, labels)["loss"]
    off = WSCLLoss(refill=False)(v, t, kappa, labels, qv, qt, qy)["loss"]
    empty = WSCLLoss()(v, t, kappa, labels, qv[:0], qt[:0], qy[:0], torch.zeros(0, dtype=torch.bool))["loss"]
    invalid = WSCLLoss()(v, t, kappa, labels, qv, qt, qy, torch.zeros(len(qv), dtype=torch.bool))["loss"]
    assert torch.equal(off, base)
    torch.testing.assert_close(empty, base)
    torch.testing.assert_close(invalid, base)


def test_queue_features_carry_no_gradient():
    v, t, kappa, labels, qv, qt, qy, valid, _ = random_case(4)
    qv, qt = qv.clone().requires_grad_(), qt.clone().requires_grad_()
    labels = labels.clone()
    labels[:] = 1
    out = WSCLLoss()(v, t, kappa, labels, qv, qt, qy)
    grads = torch.autograd.grad(out["loss"], (qv, qt), allow_unused=True)
    assert grads == (None, None)


# ----------------------------------------------------------------------------------------- numerics, edges
def test_stable_at_kappa_100_in_float32():
    gen = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 16, generator=gen), dim=1)
    v = F.normalize(base + 0.05 * torch.randn(16, 16, generator=gen), dim=1)  # all nearly parallel
    t = F.normalize(base + 0.05 * torch.randn(16, 16, generator=gen), dim=1)
    labels = random_labels(gen, 16, 3, p_empty=0.2).float()
    qv = F.normalize(base + 0.05 * torch.randn(20, 16, generator=gen), dim=1)
    qt = F.normalize(base + 0.05 * torch.randn(20, 16, generator=gen), dim=1)
    qy = random_labels(gen, 20, 3, p_empty=0.2).float()
    v32, t32 = v.clone().requires_grad_(), t.clone().requires_grad_()
    kappa = torch.tensor(100.0, requires_grad=True)
    out = WSCLLoss(gamma=2.0)(v32, t32, kappa, labels, qv, qt, qy)
    grads = torch.autograd.grad(out["loss"], (v32, t32, kappa))
    assert all(torch.isfinite(g).all() for g in grads)
    v64, t64 = v.double().requires_grad_(), t.double().requires_grad_()
    k64 = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    want = ref_wscl(
        v64, t64, k64, labels.double(), qv.double(), qt.double(), qy.double(), None, 1.0, 2.0, 1.0, True
    )[0]
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-4, atol=1e-4)


def test_single_pair_batch_has_zero_loss_and_no_nan():
    v = F.normalize(torch.randn(1, 4), dim=1).requires_grad_()
    out = WSCLLoss()(v, v.detach(), torch.tensor(10.0), torch.ones(1, 2))
    assert out["loss"].item() == 0.0
    (grad,) = torch.autograd.grad(out["loss"], v)
    assert torch.isfinite(grad).all()


def test_half_precision_features_are_computed_in_float32():
    v, t, kappa, labels, qv, qt, qy, valid, _ = random_case(6)
    out = WSCLLoss()(
        v.detach().bfloat16(), t.detach().bfloat16(), 100.0, labels, qv.float(), qt.float(), qy, valid
    )
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"delta": 0.0}, "delta"), ({"gamma": -1.0}, "gamma"), ({"lam": -0.5}, "lam")],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WSCLLoss(**kwargs)


def test_bad_shapes_are_refused_with_a_clear_message():
    v = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.ones(4, 3)
    loss_fn = WSCLLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(v, v[:, :4], 10.0, labels)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(v, v, 10.0, labels[:3])
    with pytest.raises(ValueError, match="together"):
        loss_fn(v, v, 10.0, labels, queue_image_features=torch.zeros(5, 8))
    with pytest.raises(ValueError, match=r"\[K, 8\]"):
        loss_fn(v, v, 10.0, labels, torch.zeros(5, 8), torch.zeros(5, 7), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="queue_valid"):
        loss_fn(v, v, 10.0, labels, torch.zeros(5, 8), torch.zeros(5, 8), torch.zeros(5, 3), torch.ones(5))
