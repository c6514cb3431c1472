"""Multi-label classification metrics in plain numpy: ROC AUC, average precision, F1, balanced accuracy.

The toolkit must not depend on scikit-learn at run time (hospital installs stay small), so the metrics
are written here; the tests compare every one of them with scikit-learn as the reference. Definitions
follow scikit-learn's exactly: AUC is the Mann-Whitney statistic with ties counted half; average
precision is sum_n (R_n - R_{n-1}) P_n over distinct thresholds (no interpolation); F1 and balanced
accuracy are of the thresholded prediction `score >= threshold`, with F1 = 0 when there is nothing
to find and nothing flagged.

A label whose evaluation set holds only positives or only negatives has no AUC/AP: it gets NaN, is
reported as such, and is left out of the macro averages (with the count of labels that went in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _as_1d(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.float64).ravel()
    s = np.asarray(scores).astype(np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.shape} vs {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return (y > 0.5).astype(np.int64), s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    mean_rank = (starts + ends + 1) / 2.0  # average of 1-based positions start+1 .. end
    ranks_sorted = np.repeat(mean_rank, ends - starts)
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y, s = _as_1d(y_true, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _binary_clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false and true positives at each distinct threshold, highest threshold first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_value]
    fps = (last_of_value + 1) - tps
    return fps.astype(np.float64), tps.astype(np.float64), s_sorted[last_of_value]


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) starting at (0, 0) with threshold +inf, for plotting."""
    y, s = _as_1d(y_true, scores)
    fps, tps, thr = _binary_clf_curve(y, s)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thr = np.r_[np.inf, thr]
    n_pos, n_neg = tps[-1], fps[-1]
    fpr = fps / n_neg if n_neg > 0 else np.full_like(fps, np.nan)
    tpr = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thr


def average_precision(y_true: Any, scores: Any) -> float:
    """Average precision (area under the step precision-recall curve); NaN without positives."""
    y, s = _as_1d(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    fps, tps, _ = _binary_clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    return tp, fp, fn, tn


def f1_at(y_true: Any, scores: Any, threshold: float) -> float:
    """F1 of `score >= threshold`; 0 when the denominator is 0 (sklearn's zero_division=0)."""
    y, s = _as_1d(y_true, scores)
    tp, fp, fn, _ = _confusion(y, s, threshold)
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def balanced_accuracy_at(y_true: Any, scores: Any, threshold: float) -> float:
    """Mean of sensitivity and specificity of `score >= threshold` (sklearn's balanced_accuracy_score).

    With only one class present it is that class's recall, as in scikit-learn."""
    y, s = _as_1d(y_true, scores)
    tp, fp, fn, tn = _confusion(y, s, threshold)
    recalls = []
    if tp + fn > 0:
        recalls.append(tp / (tp + fn))
    if tn + fp > 0:
        recalls.append(tn / (tn + fp))
    return float(np.mean(recalls)) if recalls else float("nan")


def youden_threshold(y_true: Any, scores: Any) -> float:
    """The threshold maximising sensitivity + specificity - 1 (a validation-split operating point)."""
    y, s = _as_1d(y_true, scores)
    fpr, tpr, thr = roc_curve(y, s)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return 0.5
    j = tpr - fpr
    k = int(np.argmax(j[1:]) + 1)  # skip the +inf start
    return float(thr[k])


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def multilabel_metrics(
    y_true: Any,
    scores: Any,
    label_ids: Sequence[str],
    threshold: float | Mapping[str, float] = 0.5,
    min_positives: int = 1,
) -> dict[str, Any]:
    """Per-label and macro metrics for an [N, C] multi-hot truth and [N, C] scores.

    Returns {"macro_auc", "macro_ap", "macro_f1", "macro_balanced_accuracy", "n_labels_evaluated",
    "n_samples", "per_label": {label: {"auc", "ap", "f1", "balanced_accuracy", "threshold",
    "n_positive", "n_negative"}}}. Labels with fewer than `min_positives` positives (or no negatives)
    have NaN AUC/AP and are left out of every macro average.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"expected [N, C] truth and scores of the same shape, got {y.shape} and {s.shape}")
    if y.shape[1] != len(label_ids):
        raise ValueError(f"{y.shape[1]} columns but {len(label_ids)} label ids")
    per: dict[str, dict[str, float]] = {}
    for j, label in enumerate(label_ids):
        thr = float(threshold[label]) if isinstance(threshold, Mapping) else float(threshold)
        yj = y[:, j] > 0.5
        n_pos = int(yj.sum())
        n_neg = int(len(yj) - n_pos)
        ok = n_pos >= max(min_positives, 1) and n_neg > 0
        per[label] = {
            "auc": roc_auc(yj, s[:, j]) if ok else float("nan"),
            "ap": average_precision(yj, s[:, j]) if ok else float("nan"),
            "f1": f1_at(yj, s[:, j], thr) if ok else float("nan"),
            "balanced_accuracy": balanced_accuracy_at(yj, s[:, j], thr) if ok else float("nan"),
            "threshold": thr,
            "n_positive": n_pos,
            "n_negative": n_neg,
        }
    evaluated = [p for p in per.values() if not math.isnan(p["auc"])]
    return {
        "macro_auc": _nanmean([p["auc"] for p in evaluated]),
        "macro_ap": _nanmean([p["ap"] for p in evaluated]),
        "macro_f1": _nanmean([p["f1"] for p in evaluated]),
        "macro_balanced_accuracy": _nanmean([p["balanced_accuracy"] for p in evaluated]),
        "n_labels_evaluated": len(evaluated),
        "n_samples": int(y.shape[0]),
        "per_label": per,
    }
