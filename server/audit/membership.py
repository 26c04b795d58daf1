"""Membership-inference figures, as pure functions of two score arrays.

A score is "how member-like" an item looks (higher = more likely a member), e.g. minus its
loss under the fine-tuned model. Given scores of members (``inside``) and non-members
(``outside``), a threshold t predicts "member" when score >= t, which gives one point
(FPR, TPR) of the ROC curve.

The (epsilon, delta)-DP bound: any test of "was this item in the training data" has, at every
threshold, TPR <= e^epsilon * FPR + delta (and the same with the roles of the two worlds
swapped: TNR <= e^epsilon * FNR + delta). An empirical ROC contradicts the guarantee only when
a one-sided 95% Clopper-Pearson LOWER bound on TPR exceeds e^epsilon times the UPPER bound on
FPR plus delta; :func:`empirical_epsilon` is the largest epsilon such evidence supports.

Example (hand-checkable):
    >>> roc_auc([3.0, 2.0], [1.0, 2.0])   # pairs: (3>1) (3>2) (2>1) (2=2 counts 1/2)
    0.875
    >>> tpr_at_fpr([3.0, 2.0], [1.0, 2.0], 0.0)   # t=3: FPR 0, TPR 1/2
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import beta

__all__ = [
    "bootstrap_ci",
    "bound_check",
    "clopper_pearson",
    "empirical_epsilon",
    "membership_summary",
    "roc_auc",
    "roc_points",
    "tpr_at_fpr",
]

Scores = Sequence[float] | np.ndarray


def _arrays(inside: Scores, outside: Scores) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need members and non-members, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    return a, b


def roc_points(inside: Scores, outside: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for every distinct threshold, from (0, 0) to (1, 1).

    The first point uses threshold +inf (nothing predicted member).
    """
    a, b = _arrays(inside, outside)
    thresholds = np.unique(np.concatenate([a, b]))[::-1]  # descending
    # count of scores >= t, via sorted arrays
    tp = a.size - np.searchsorted(np.sort(a), thresholds, side="left")
    fp = b.size - np.searchsorted(np.sort(b), thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / b.size])
    tpr = np.concatenate([[0.0], tp / a.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def roc_auc(inside: Scores, outside: Scores) -> float:
    """P(member score > non-member score) + P(equal) / 2 (the Mann-Whitney statistic)."""
    a, b = _arrays(inside, outside)
    order = np.sort(b)
    below = np.searchsorted(order, a, side="left")
    equal = np.searchsorted(order, a, side="right") - below
    return float((below + 0.5 * equal).sum() / (a.size * b.size))


def tpr_at_fpr(inside: Scores, outside: Scores, fpr: float) -> float:
    """The best TPR among thresholds whose FPR is at most ``fpr``."""
    rates, tprs, _ = roc_points(inside, outside)
    return float(tprs[rates <= fpr + 1e-12].max())


def bootstrap_ci(
    inside: Scores,
    outside: Scores,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    reps: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling members and non-members independently."""
    a, b = _arrays(inside, outside)
    rng = np.random.default_rng(seed)
    values = [statistic(rng.choice(a, a.size), rng.choice(b, b.size)) for _ in range(reps)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def clopper_pearson(successes: int | np.ndarray, trials: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds: ``(lower, upper)``, each holding with probability ``level``."""
    k = np.asarray(successes, dtype=np.float64)
    alpha = 1 - level
    lower = np.where(k > 0, beta.ppf(alpha, k, trials - k + 1), 0.0)
    upper = np.where(k < trials, beta.ppf(1 - alpha, k + 1, trials - k), 1.0)
    return lower, upper


def _rate_bounds(inside: Scores, outside: Scores, level: float) -> tuple[np.ndarray, ...]:
    """``(TPR_lo, FPR_hi, TNR_lo, FNR_hi)`` per threshold, all holding together with prob. ``level``.

    Every threshold and both directions are tested, so each bound is taken at a Bonferroni-
    corrected level: a contradiction claimed here survives the multiple comparisons.
    """
    a, b = _arrays(inside, outside)
    fpr, tpr, _ = roc_points(a, b)
    tp, fp = np.rint(tpr * a.size), np.rint(fpr * b.size)
    each = 1 - (1 - level) / (4 * tp.size)
    tpr_lo, _ = clopper_pearson(tp, a.size, each)
    _, fpr_hi = clopper_pearson(fp, b.size, each)
    # the swapped test, "non-member" when score < t: TNR = 1 - FPR, FNR = 1 - TPR
    return tpr_lo, fpr_hi, 1 - fpr_hi, 1 - tpr_lo


def empirical_epsilon(inside: Scores, outside: Scores, delta: float, level: float = 0.95) -> float:
    """Largest epsilon the ROC supports at confidence ``level``: max over thresholds of
    ``log((TPR_lo - delta) / FPR_hi)`` and ``log((TNR_lo - delta) / FNR_hi)``; 0 if none is positive."""
    tpr_lo, fpr_hi, tnr_lo, fnr_hi = _rate_bounds(inside, outside, level)
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        ok = (num > 0) & (den > 0)
        if ok.any():
            best = max(best, float(np.log(num[ok] / den[ok]).max()))
    return best


def bound_check(inside: Scores, outside: Scores, epsilon: float, delta: float, level: float = 0.95) -> dict:
    """Does the ROC contradict (epsilon, delta)-DP? Compares confidence bounds at every threshold."""
    tpr_lo, fpr_hi, tnr_lo, fnr_hi = _rate_bounds(inside, outside, level)
    factor = math.exp(min(epsilon, 700.0))
    slack = np.maximum(tpr_lo - (factor * fpr_hi + delta), tnr_lo - (factor * fnr_hi + delta))
    return {
        "epsilon": epsilon,
        "delta": delta,
        "confidence": level,
        "contradicts": bool((slack > 0).any()),
        "empirical_epsilon_lower_bound": empirical_epsilon(inside, outside, delta, level),
    }


def membership_summary(inside: Scores, outside: Scores, reps: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at 1% and 0.1% FPR, each with a 95% bootstrap interval, plus the ROC."""
    a, b = _arrays(inside, outside)
    fpr, tpr, _ = roc_points(a, b)
    out: dict = {"members": int(a.size), "non_members": int(b.size)}
    stats = {
        "auc": roc_auc,
        "tpr_at_1pct_fpr": lambda x, y: tpr_at_fpr(x, y, 0.01),
        "tpr_at_0.1pct_fpr": lambda x, y: tpr_at_fpr(x, y, 0.001),
    }
    for name, fn in stats.items():
        out[name] = fn(a, b)
        out[f"{name}_ci95"] = list(bootstrap_ci(a, b, fn, reps, seed=seed))
    out["roc"] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}
    return out
