"""Grading metrics in plain numpy: kappa, confusion matrix, per-class scores, AUC.

Accuracy alone hid the reference works' failures (a model answering "grade 0" scores 73 %
on EyePACS); quadratic weighted kappa, the Kaggle competition metric, does not.
"""

from __future__ import annotations

import numpy as np

from tfrecord_writer.schema import N_GRADES, REFERABLE_MIN_GRADE

# Cut points turning a regression score into grades before any are fitted (and the start
# of the fit, kappa_thresholds): halfway between the grades.
DEFAULT_CUTS = (0.5, 1.5, 2.5, 3.5)
# A referable model's output (P(grade >= REFERABLE_MIN_GRADE)) at or above this: referable.
REFERABLE_CUT = 0.5


def confusion(y_true, y_pred, n: int = N_GRADES) -> np.ndarray:
    """n x n counts, rows = true class, columns = predicted class."""
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def quadratic_kappa(y_true, y_pred, n: int = N_GRADES) -> float:
    """Cohen's kappa with quadratic weights (1 = perfect, 0 = chance, < 0 = worse)."""
    o = confusion(y_true, y_pred, n).astype(float)
    total = o.sum()
    if total == 0:
        return 0.0
    i, j = np.indices((n, n))
    w = (i - j) ** 2 / (n - 1) ** 2
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / total
    denom = (w * e).sum()
    return float(1 - (w * o).sum() / denom) if denom > 0 else 0.0


def per_class(y_true, y_pred, n: int = N_GRADES) -> dict[str, list[float]]:
    m = confusion(y_true, y_pred, n).astype(float)
    tp = np.diag(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / m.sum(axis=0))
        recall = np.nan_to_num(tp / m.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"precision": precision.round(4).tolist(), "recall": recall.round(4).tolist(),
            "f1": f1.round(4).tolist(), "support": m.sum(axis=1).astype(int).tolist()}


def roc_auc(y_true, score) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties averaged)."""
    y = np.asarray(y_true, bool)
    s = np.asarray(score, float)
    pos, neg = y.sum(), (~y).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def grade_metrics(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "quadratic_kappa": quadratic_kappa(y_true, y_pred),
        "per_class": per_class(y_true, y_pred),
        "confusion_matrix": confusion(y_true, y_pred).tolist(),
        # what always answering the majority grade would score: the bar to clear
        "majority_baseline_accuracy": float(np.bincount(y_true, minlength=N_GRADES).max()
                                            / max(len(y_true), 1)),
    }


def referable_metrics(y_true_grade, p_referable, threshold: float = REFERABLE_CUT) -> dict:
    """Binary referable DR (grade >= 2): AUC, sensitivity, specificity, accuracy."""
    y = np.asarray(y_true_grade) >= REFERABLE_MIN_GRADE
    p = np.asarray(p_referable, float)
    pred = p >= threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    return {
        "n": int(len(y)),
        "auc": roc_auc(y, p),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "accuracy": (tp + tn) / max(len(y), 1),
        "threshold": threshold,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def kappa_thresholds(y_true, y_score, start=DEFAULT_CUTS, rounds: int = 3) -> list[float]:
    """Cut points turning a regression score into grades, tuned for quadratic kappa.

    Coordinate search over each cut in turn (Barh; the Kaggle "optimised rounder"),
    deterministic. Fit on validation predictions, then apply to any split.
    """
    cuts = list(start)
    y_true = np.asarray(y_true, int)
    y_score = np.asarray(y_score, float)
    for _ in range(rounds):
        for k in range(len(cuts)):
            lo = cuts[k - 1] + 0.01 if k > 0 else -1.0
            hi = cuts[k + 1] - 0.01 if k + 1 < len(cuts) else 5.0
            best, best_kappa = cuts[k], -2.0
            for c in np.linspace(lo, hi, 41):
                trial = cuts[:k] + [float(c)] + cuts[k + 1:]
                kappa = quadratic_kappa(y_true, apply_thresholds(y_score, trial))
                if kappa > best_kappa + 1e-12:
                    best, best_kappa = float(c), kappa
            cuts[k] = best
    return [round(c, 4) for c in cuts]


def apply_thresholds(y_score, cuts) -> np.ndarray:
    return np.searchsorted(np.asarray(cuts), np.asarray(y_score, float), side="right")


def decide(task: str, outputs, cuts=None) -> np.ndarray:
    """The decision for each row of a model's ``outputs`` [n, k]: the grade (task "grade":
    the most probable; "regression": the score cut at ``cuts``, default
    :data:`DEFAULT_CUTS`) or, task "referable", 1 when P(referable) reaches
    :data:`REFERABLE_CUT`. The ONE place a grade is decided: evaluate, predict and export
    all call it."""
    outputs = np.asarray(outputs)
    if task == "grade":
        return outputs.argmax(axis=1)
    if task == "referable":
        return (outputs[:, 0] >= REFERABLE_CUT).astype(int)
    return apply_thresholds(outputs[:, 0], cuts or DEFAULT_CUTS)
