"""Metrics against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training import metrics as M


def _kappa_bruteforce(a, b, n=5):
    o = np.zeros((n, n))
    for x, y in zip(a, b, strict=True):
        o[x, y] += 1
    w = np.array([[(i - j) ** 2 for j in range(n)] for i in range(n)], float) / (n - 1) ** 2
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    return 1 - (w * o).sum() / (w * e).sum()


def test_kappa_known_values():
    y = [0, 1, 2, 3, 4, 0, 1, 2]
    assert M.quadratic_kappa(y, y) == pytest.approx(1.0)
    assert M.quadratic_kappa(y, [4 - v for v in y]) < -0.5
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert M.quadratic_kappa(a, b) == pytest.approx(_kappa_bruteforce(a, b))
    assert abs(M.quadratic_kappa(a, b)) < 0.15  # random guessing ~ chance


def test_majority_class_model_has_zero_kappa_despite_high_accuracy():
    y = [0] * 73 + [1] * 7 + [2] * 15 + [3] * 3 + [4] * 2
    r = M.grade_metrics(y, [0] * len(y))
    assert r["accuracy"] == 0.73 and r["quadratic_kappa"] == pytest.approx(0.0)
    assert r["per_class"]["recall"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) + 0.3 * y, 1)  # with ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)]
    assert M.roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_referable_sensitivity_specificity():
    r = M.referable_metrics([0, 1, 2, 3, 4, 0], [0.1, 0.7, 0.9, 0.4, 0.8, 0.2])
    assert r["sensitivity"] == pytest.approx(2 / 3)  # grades 2,3,4: 3 missed at 0.4
    assert r["specificity"] == pytest.approx(2 / 3)  # grades 0,1,0: 1 (0.7) flagged
    assert r["confusion_matrix"] == [[2, 1], [1, 2]]


def test_kappa_thresholds_beat_plain_rounding():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 400)
    score = y * 0.6 + rng.normal(0, 0.35, 400)  # a regressor that under-predicts
    plain = M.quadratic_kappa(y, M.apply_thresholds(score, [0.5, 1.5, 2.5, 3.5]))
    cuts = M.kappa_thresholds(y, score)
    tuned = M.quadratic_kappa(y, M.apply_thresholds(score, cuts))
    assert tuned > plain + 0.05
    assert cuts == sorted(cuts)
