"""Out-of-distribution detection metrics: AUROC, a threshold at a target false-positive rate,
and the standard logit-based detectors (MSP, MaxLogit, Energy).

Every score here is an *anomaly* score: higher means more likely out of distribution, and
an input is flagged when its score is strictly greater than the threshold (the rule the
anomaly verdict uses, see :mod:`explainserve.anomaly.calibration`). Pure numpy.
"""

from __future__ import annotations

import math

import numpy as np


def _scores(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError(f"{name}: expected at least one score")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: scores must be finite")
    return values


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve of telling ``out_scores`` (positives) from ``in_scores``.

    The probability that an out-of-distribution input scores higher than an in-distribution
    one, ties counting one half (the Mann-Whitney U statistic over n_in * n_out pairs),
    computed from average ranks. Equals ``sklearn.metrics.roc_auc_score``.
    """
    negatives, positives = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    combined = np.concatenate([negatives, positives])
    order = np.argsort(combined, kind="mergesort")
    ranks = np.empty(combined.size, dtype=np.float64)
    ranks[order] = np.arange(1, combined.size + 1)
    # Average the ranks of tied values.
    _, inverse = np.unique(combined, return_inverse=True)
    ranks = (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]
    n_out, n_in = positives.size, negatives.size
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_out * n_in))


def auroc_standard_error(area: float, n_in: int, n_out: int) -> float:
    """Approximate standard error of an AUROC from ``n_in`` negatives and ``n_out`` positives
    (Hanley & McNeil 1982, exponential approximation; ties ignored). AUROCs of two detectors on
    the same images are correlated, so their difference is usually known better than this says."""
    if not 0 <= area <= 1 or n_in < 1 or n_out < 1:
        raise ValueError(f"expected an AUROC in [0, 1] and counts >= 1, got {area}, {n_in}, {n_out}")
    q1, q2 = area / (2 - area), 2 * area * area / (1 + area)
    variance = (area * (1 - area) + (n_out - 1) * (q1 - area * area) + (n_in - 1) * (q2 - area * area)) / (n_in * n_out)
    return float(math.sqrt(max(variance, 0.0)))


def threshold_at_fpr(in_scores, target_fpr: float) -> float:
    """The lowest threshold t that flags (score > t) at most ``target_fpr`` of ``in_scores``.

    t is the (m+1)-th largest in-distribution score with m = floor(target_fpr * n), so with
    ties (integer counts) the flagged fraction can fall well below the target: the rate is
    never exceeded on these scores, as in the verdict's calibration.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    values = np.sort(_scores(in_scores, "in_scores"))[::-1]
    allowed = math.floor(target_fpr * values.size + 1e-9)
    return float(values[min(allowed, values.size - 1)])


def flagged_rate(scores, threshold: float) -> float:
    """Fraction of ``scores`` strictly above ``threshold`` (FPR on in-distribution data, TPR on OOD)."""
    return float((_scores(scores, "scores") > threshold).mean())


def _logits(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits: expected shape (B, N), got {logits.shape}")
    return logits


def logsumexp(logits) -> np.ndarray:
    """(B,) log sum_c exp(logit_c), computed stably."""
    logits = _logits(logits)
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def msp_score(logits) -> np.ndarray:
    """Anomaly score of MSP (Hendrycks & Gimpel): minus the maximum softmax probability."""
    logits = _logits(logits)
    return -np.exp(logits.max(axis=1) - logsumexp(logits))


def max_logit_score(logits) -> np.ndarray:
    """Anomaly score of MaxLogit (Hendrycks et al.): minus the largest logit."""
    return -_logits(logits).max(axis=1)


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """Free energy E(x) = -T log sum_c exp(logit_c / T) (Liu et al.), higher for OOD inputs."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return -temperature * logsumexp(_logits(logits) / temperature)


BASELINES = {"MSP": msp_score, "MaxLogit": max_logit_score, "Energy": energy_score}


def auroc_bootstrap_interval(in_scores, out_scores, *, resamples: int = 200, level: float = 0.95,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc`: negatives and positives resampled with
    replacement, each on its own. The same ``seed`` draws the same resamples for every detector
    scored on the same images, so their intervals are comparable.

    Returns
    -------
    (float, float)
        The (1 - level) / 2 and (1 + level) / 2 quantiles of ``resamples`` bootstrap AUROCs.
    """
    if resamples < 2 or not 0 < level < 1:
        raise ValueError(f"expected resamples >= 2 and level in (0, 1), got {resamples}, {level}")
    negatives, positives = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    rng = np.random.default_rng(seed)
    areas = [auroc(negatives[rng.integers(0, negatives.size, negatives.size)],
                   positives[rng.integers(0, positives.size, positives.size)]) for _ in range(resamples)]
    low, high = np.quantile(areas, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def exact_mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test of two detectors flagging the same inputs: the p-value that
    their flag rates are equal, from the inputs only one of them flags.

    Parameters
    ----------
    only_first, only_second : int
        Inputs flagged by the first detector and not the second, and the reverse.

    Returns
    -------
    float
        min(1, 2 P(X <= min(b, c))) for X ~ Binomial(b + c, 1/2); 1.0 without discordant inputs.
    """
    if min(only_first, only_second) < 0:
        raise ValueError(f"counts must be >= 0, got {only_first} and {only_second}")
    total, smaller = only_first + only_second, min(only_first, only_second)
    tail = sum(math.comb(total, k) for k in range(smaller + 1)) / 2 ** total
    return min(1.0, 2 * tail)
