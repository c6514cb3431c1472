"""Linear probe: logistic regression on frozen image features, the paper's transfer-learning check.

Zero-shot measures what the text tower learned to name; a linear probe measures what the image tower
learned to see, independent of the prompts. Features are the image tower's pre-projection output
(as ViLReF's linear-probing code reads them), standardised with the training split's statistics;
one independent L2-regularised logistic regression per label is fitted by full-batch L-BFGS in torch
(convex, so the optimum is unique and reproducible; the tests check it against scikit-learn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vilref_fed.eval.metrics import multilabel_metrics


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, dataset: Any, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F], truth [N, C]) with the model in eval mode (its mode is restored after)."""
    from torch.utils.data import DataLoader

    m = model.module if hasattr(model, "module") else model
    dev = next(m.parameters()).device
    was_training = m.training
    m.eval()
    feats, truth = [], []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda items: items)
        for items in loader:
            x = torch.stack([it["image"] for it in items]).to(dev)
            key = "truth" if "truth" in items[0] else "labels"
            feats.append(m.image_backbone_features(x).float().cpu())
            truth.append(torch.stack([torch.as_tensor(it[key], dtype=torch.float32) for it in items]))
    finally:
        m.train(was_training)
    if not feats:
        raise ValueError("the dataset is empty")
    return torch.cat(feats).numpy(), torch.cat(truth).numpy()


def fit_logistic(
    features: np.ndarray, targets: np.ndarray, l2: float = 1e-2, max_iter: int = 300, tol: float = 1e-9
) -> tuple[np.ndarray, np.ndarray]:
    """Independent logistic regressions for the C columns of targets: returns (W [F, C], b [C]).

    Objective per column: mean binary cross-entropy + l2/2 * ||w||^2 (bias not penalised), which is
    scikit-learn's LogisticRegression with C = 1 / (n * l2). Fitted in float64 by L-BFGS.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if y.ndim == 1:
        y = y[:, None]
    n, f = x.shape
    w = torch.zeros(f, y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = train.mean(0, keepdims=True)
    sd = train.std(0, keepdims=True)
    sd[sd < 1e-8] = 1.0
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(
    model: torch.nn.Module,
    train_dataset: Any,
    test_dataset: Any,
    label_ids: Sequence[str],
    l2: float = 1e-2,
    max_iter: int = 300,
    threshold: float = 0.5,
    min_positives: int = 5,
    batch_size: int = 64,
    return_arrays: bool = False,
) -> dict[str, Any]:
    """Fit on the train split's frozen features, score the test split: multilabel_metrics + settings.

    Labels without both classes in the training split are not fitted (their test scores are 0.5) and
    therefore show up with their test-set AUC as 0.5 at most; they stay out of the macro only when the
    test split lacks them.
    """
    label_ids = list(label_ids)
    xtr, ytr = extract_features(model, train_dataset, batch_size)
    xte, yte = extract_features(model, test_dataset, batch_size)
    cols_tr = _columns(train_dataset, label_ids)
    cols_te = _columns(test_dataset, label_ids)
    ytr, yte = ytr[:, cols_tr], yte[:, cols_te]
    xtr, xte = _standardise(xtr, xte)
    fit_cols = [j for j in range(len(label_ids)) if 0 < ytr[:, j].sum() < len(ytr)]
    scores = np.full(yte.shape, 0.5)
    if fit_cols:
        w, b = fit_logistic(xtr, ytr[:, fit_cols], l2=l2, max_iter=max_iter)
        scores[:, fit_cols] = 1.0 / (1.0 + np.exp(-(xte @ w + b)))
    out = multilabel_metrics(yte, scores, label_ids, threshold=threshold, min_positives=min_positives)
    out.update({"l2": l2, "n_train": int(len(xtr)), "feature_dim": int(xtr.shape[1]), "label_ids": label_ids})
    if return_arrays:
        out["y_true"], out["scores"] = yte, scores
    return out


def _columns(dataset: Any, label_ids: list[str]) -> list[int]:
    ds_labels = list(getattr(dataset, "label_ids", label_ids))
    missing = [x for x in label_ids if x not in ds_labels]
    if missing:
        raise ValueError(f"labels {missing} are not in the dataset's label columns")
    return [ds_labels.index(x) for x in label_ids]
