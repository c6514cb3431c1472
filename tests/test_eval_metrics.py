"""Our numpy metrics against scikit-learn, the obviously-correct reference (sklearn is test-only)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from vilref_fed.eval.metrics import (
    average_precision,
    balanced_accuracy_at,
    f1_at,
    multilabel_metrics,
    roc_auc,
    roc_curve,
    youden_threshold,
)


def _cases():
    rng = np.random.default_rng(0)
    for i in range(40):
        n = int(rng.integers(2, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.7)).astype(int)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        if i % 3 == 0:  # heavy ties: scores on a coarse grid
            s = np.round(rng.random(n) * 4) / 4
        elif i % 3 == 1:
            s = rng.normal(size=n) + y * rng.uniform(0, 2)
        else:
            s = rng.random(n)
        yield y, s


@pytest.mark.parametrize("case", list(_cases()))
def test_auc_ap_match_sklearn(case):
    y, s = case
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("case", list(_cases())[:15])
@pytest.mark.parametrize("thr", [0.0, 0.25, 0.5, 0.9])
def test_thresholded_metrics_match_sklearn(case, thr):
    y, s = case
    pred = (s >= thr).astype(int)
    assert f1_at(y, s, thr) == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skm.balanced_accuracy_score(y, pred)
    assert balanced_accuracy_at(y, s, thr) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("case", list(_cases())[:10])
def test_roc_curve_matches_sklearn_points(case):
    y, s = case
    fpr, tpr, thr = roc_curve(y, s)
    rf, rt, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf, atol=1e-12)
    np.testing.assert_allclose(tpr, rt, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=-3, max_value=3)), min_size=2, max_size=40
    ).filter(lambda xs: len({b for b, _ in xs}) == 2)
)
def test_auc_property_against_sklearn(pairs):
    y = np.array([int(b) for b, _ in pairs])
    s = np.array([float(v) for _, v in pairs])
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_single_class_gives_nan_and_is_left_out_of_macro():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]])
    m = multilabel_metrics(y, s, ["a", "b"])
    assert m["per_label"]["a"]["auc"] == 1.0
    assert math.isnan(m["per_label"]["b"]["auc"])
    assert m["n_labels_evaluated"] == 1
    assert m["macro_auc"] == 1.0
    assert m["per_label"]["b"]["n_positive"] == 0


def test_multilabel_macro_matches_sklearn_macro():
    rng = np.random.default_rng(3)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    s = rng.random((200, 6)) + 0.5 * y
    m = multilabel_metrics(y, s, [f"l{i}" for i in range(6)], threshold=0.8)
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert m["macro_ap"] == pytest.approx(skm.average_precision_score(y, s, average="macro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, (s >= 0.8).astype(int), average="macro"), abs=1e-12)


def test_per_label_thresholds_and_shape_errors():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.6, 0.1], [0.4, 0.3], [0.7, 0.35], [0.2, 0.05]])
    m = multilabel_metrics(y, s, ["a", "b"], threshold={"a": 0.5, "b": 0.25})
    assert m["per_label"]["b"]["f1"] == 1.0 and m["per_label"]["b"]["threshold"] == 0.25
    with pytest.raises(ValueError):
        multilabel_metrics(y, s[:, :1], ["a", "b"])
    with pytest.raises(ValueError):
        multilabel_metrics(y, s, ["a"])


def test_youden_threshold_separates_a_separable_set():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = youden_threshold(y, s)
    assert 0.3 < t <= 0.6
    assert balanced_accuracy_at(y, s, t) == 1.0
