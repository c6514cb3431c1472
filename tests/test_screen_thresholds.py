"""Operating points: the fast threshold search against a slow, obviously-correct scan; CLI parsing."""

from __future__ import annotations

import numpy as np
import pytest

from vilref_fed.eval.thresholds import (
    operating_points,
    parse_threshold_options,
    resolve_thresholds,
    threshold_for_sensitivity,
)


def _reference_threshold(y: np.ndarray, s: np.ndarray, target: float) -> float | None:
    """Scan every candidate threshold from the highest down; the first that reaches the target wins."""
    if not y.any():
        return None
    for t in sorted(set(s.tolist()), reverse=True):
        sensitivity = ((s >= t) & y).sum() / y.sum()
        if sensitivity >= target - 1e-12:
            return float(t)
    raise AssertionError("unreachable: the lowest score flags every positive")


@pytest.mark.parametrize("seed", range(40))
def test_threshold_matches_reference_scan(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y = rng.random(n) < rng.uniform(0.05, 0.9)
    s = rng.random(n)
    if seed % 3 == 0:
        s = np.round(s, 1)  # many ties
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        assert threshold_for_sensitivity(y, s, target) == _reference_threshold(y, s, target)


def test_threshold_reaches_target_and_is_the_highest_that_does():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.65, 0.1, 0.05])
    t = threshold_for_sensitivity(y, s, 0.9)
    assert t == pytest.approx(0.3)
    assert ((s >= t) & y).sum() == 9
    assert ((s >= 0.3 + 1e-9) & y).sum() < 9


def test_operating_points_skip_labels_without_positives_and_report_specificity():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.2], [0.4, 0.8], [0.6, 0.1], [0.7, 0.3]])
    pts = operating_points(y, s, ["a", "b"], target_sensitivity=1.0)
    assert set(pts) == {"a"}
    a = pts["a"]
    assert a.threshold == pytest.approx(0.6) and a.sensitivity == 1.0
    assert a.specificity == pytest.approx(0.5) and (a.n_positive, a.n_negative) == (2, 2)
    with pytest.raises(ValueError):
        operating_points(y, s[:, :1], ["a", "b"])
    with pytest.raises(ValueError):
        threshold_for_sensitivity(y[:, 0], s[:, 0], 0.0)


def test_parse_and_resolve_thresholds_precedence():
    labels = ["normal", "glaucoma", "diabetic_retinopathy"]
    g, per = parse_threshold_options(["0.4", "glaucoma=0.2"], labels)
    assert g == 0.4 and per == {"glaucoma": 0.2}
    t, src = resolve_thresholds(labels, {"glaucoma": 0.7, "diabetic_retinopathy": 0.6}, g, per)
    assert t == {"normal": 0.4, "glaucoma": 0.2, "diabetic_retinopathy": 0.4}
    assert src == {"normal": "cli", "glaucoma": "cli-label", "diabetic_retinopathy": "cli"}
    t, src = resolve_thresholds(labels, {"glaucoma": 0.7}, None, {})
    assert t == {"normal": 0.5, "glaucoma": 0.7, "diabetic_retinopathy": 0.5}
    assert src["glaucoma"] == "model" and src["normal"] == "default"
    for bad, msg in (("glaucom=0.2", "unknown label"), ("abc", "not a number"), ("1.5", "between 0 and 1")):
        with pytest.raises(ValueError, match=msg):
            parse_threshold_options([bad], labels)


def test_operating_points_carry_the_validation_auc():
    rng = np.random.default_rng(5)
    y = rng.random((200, 2)) < 0.3
    s = np.where(y, rng.normal(1.0, 1.0, y.shape), rng.normal(0.0, 1.0, y.shape))
    s[:, 1] = rng.random(200)  # no skill at all
    pts = operating_points(y, s, ["good", "chance"], 0.8)
    pos, neg = s[y[:, 0], 0], s[~y[:, 0], 0]
    reference = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert pts["good"].auc == pytest.approx(reference)
    assert pts["good"].auc > 0.7 and abs(pts["chance"].auc - 0.5) < 0.12


def test_unreliable_labels_are_never_flagged_unless_the_command_line_says_so():
    labels = ["glaucoma", "laser_scars"]
    t, src = resolve_thresholds(
        labels, {"glaucoma": 0.4, "laser_scars": 0.2}, unreliable={"laser_scars": 0.41}
    )
    assert t == {"glaucoma": 0.4, "laser_scars": None} and src["laser_scars"] == "unreliable"
    t, src = resolve_thresholds(labels, {}, None, {"laser_scars": 0.7}, unreliable={"laser_scars": 0.41})
    assert t["laser_scars"] == 0.7 and src["laser_scars"] == "cli-label"
    t, src = resolve_thresholds(labels, {}, 0.3, {}, unreliable={"laser_scars": 0.41})
    assert t == {"glaucoma": 0.3, "laser_scars": 0.3}
