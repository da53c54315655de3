"""Calibrate the verdict thresholds on held-out in-distribution data to a target false-positive rate.

The verdict flags an input when any of three statistics is extreme for its class:

- surprise count   > t_s  (surprising filters, alpha_n > P99.9_cn)
- expectation count > t_e (expected-but-missing filters)
- β_z              < t_β  (β standardised by the class's training β median and IQR)

The three thresholds are chosen jointly, as order statistics of the held-out values: for a
rank m, t_s is the (m+1)-th largest surprise count, t_e the (m+1)-th largest expectation count
and t_β the (m+1)-th smallest β_z. The flagged fraction grows with m, so a bisection finds the
largest m whose *union* flags at most ``target_fpr`` of the held-out images. Counts are small
integers with many ties, which is why the union is what gets calibrated, not each test alone.

Classes with at least ``min_class_count`` held-out images get their own thresholds; the rest
use a class-independent fallback fitted on all held-out images pooled (counts and β_z mean the
same thing in every class). Use the class the server will score against (the predicted class)
for the held-out images, so the calibrated rate is the served one.

How many images a class needs: thresholds fitted on n images overshoot the target on new
data, because the tail is estimated from few points and three tests are combined. Simulated
at a 1 % target (Poisson surprise and expectation counts, normal β_z, 200 fits each), the
mean realised rate is 6.7 % for n = 30, 2.4 % for 100, 1.7 % for 200, 1.2 % for 500 and
1.06 % for 1000. The default minimum is therefore max(30, 5 / target_fpr): 500 images at 1 %.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from explainserve.anomaly.reference import ClassReference, FilterStatistics
from explainserve.anomaly.store import DistributionStore, write_manifest

DEFAULT_TARGET_FPR = 0.01
SMALLEST_MIN_CLASS_COUNT = 30


def default_min_class_count(target_fpr: float) -> int:
    """Held-out images a class needs for its own thresholds: max(30, ceil(5 / target_fpr))."""
    return max(SMALLEST_MIN_CLASS_COUNT, math.ceil(5 / target_fpr - 1e-9))


@dataclass(frozen=True)
class Thresholds:
    """Flag an input when surprise_count > surprise, expectation_count > expectation or
    beta_z < beta_z. ``count`` is the number of held-out images they were fitted on."""

    surprise: int
    expectation: int
    beta_z: float
    count: int


def union_flags(surprise, expectation, beta_z, thresholds: Thresholds | tuple) -> np.ndarray:
    """(B,) bool, whether any of the three tests fires; ``thresholds`` may hold (B,) arrays."""
    t_surprise, t_expectation, t_beta = (
        (thresholds.surprise, thresholds.expectation, thresholds.beta_z)
        if isinstance(thresholds, Thresholds) else thresholds
    )
    return (surprise > t_surprise) | (expectation > t_expectation) | (beta_z < t_beta)


def fit_thresholds(surprise: np.ndarray, expectation: np.ndarray, beta_z: np.ndarray,
                   target_fpr: float) -> Thresholds:
    """Joint thresholds flagging at most ``target_fpr`` of these held-out images.

    Parameters
    ----------
    surprise, expectation : np.ndarray
        (n,) int counts of held-out images, n >= 1.
    beta_z : np.ndarray
        (n,) float.
    target_fpr : float
        In (0, 1).

    Returns
    -------
    Thresholds
    """
    count = len(surprise)
    descending_s = np.sort(surprise)[::-1]
    descending_e = np.sort(expectation)[::-1]
    ascending_z = np.sort(beta_z)
    allowed = math.floor(target_fpr * count + 1e-9)

    def at(rank: int) -> Thresholds:
        return Thresholds(int(descending_s[rank]), int(descending_e[rank]), float(ascending_z[rank]), count)

    low, high = 0, count - 1  # rank 0 flags nothing; find the largest feasible rank
    while low < high:
        middle = (low + high + 1) // 2
        if union_flags(surprise, expectation, beta_z, at(middle)).sum() <= allowed:
            low = middle
        else:
            high = middle - 1
    return at(low)


def calibrate(store: DistributionStore, alpha: np.ndarray, classes: np.ndarray, *,
              target_fpr: float = DEFAULT_TARGET_FPR, min_class_count: int | None = None,
              scored_against: str = "predicted") -> dict:
    """Fit per-class and fallback thresholds on held-out in-distribution alpha vectors.

    Parameters
    ----------
    store : DistributionStore
        A complete store.
    alpha : np.ndarray
        (n, K) float32 held-out filter scores, each computed for the class in ``classes``.
    classes : np.ndarray
        (n,) int class each image is scored against (the predicted class, as served).
    target_fpr : float
        Target false-positive rate in (0, 1); default 1 %.
    min_class_count : int, optional
        Classes with fewer held-out images use the fallback; >= 1. Default
        :func:`default_min_class_count` (see the module docstring).
    scored_against : str
        Recorded in the manifest: which class the held-out images were scored against.

    Returns
    -------
    dict
        The manifest's ``calibration`` section (see :func:`save_calibration`).
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if min_class_count is None:
        min_class_count = default_min_class_count(target_fpr)
    if min_class_count < 1:
        raise ValueError(f"min_class_count must be >= 1, got {min_class_count}")
    reference = ClassReference(store)
    alpha, classes = reference.check(alpha, classes)
    if len(alpha) == 0:
        raise ValueError("calibration needs at least one held-out image")
    stats: FilterStatistics = reference.statistics(alpha, classes)
    fallback = fit_thresholds(stats.surprise_count, stats.expectation_count, stats.beta_z, target_fpr)
    per_class = {name: [] for name in ("surprise", "expectation", "beta_z", "count", "source")}
    chosen = []
    for class_id in range(reference.num_classes):
        rows = classes == class_id
        count = int(rows.sum())
        own = count >= min_class_count
        fitted = (fit_thresholds(stats.surprise_count[rows], stats.expectation_count[rows], stats.beta_z[rows], target_fpr)
                  if own else fallback)
        chosen.append(fitted)
        for name in ("surprise", "expectation", "beta_z"):
            per_class[name].append(getattr(fitted, name))
        per_class["count"].append(count)
        per_class["source"].append("class" if own else "fallback")
    used = tuple(np.array([getattr(t, name) for t in chosen])[classes] for name in ("surprise", "expectation", "beta_z"))
    flagged = union_flags(stats.surprise_count, stats.expectation_count, stats.beta_z, used)
    return {
        "target_fpr": target_fpr,
        "min_class_count": min_class_count,
        "scored_against": scored_against,
        "held_out_images": len(alpha),
        "held_out_fpr": float(flagged.mean()),
        "fallback": asdict(fallback),
        "classes": per_class,
    }


def save_calibration(store: DistributionStore, calibration: dict) -> None:
    """Record ``calibration`` in the store's manifest (arrays are not touched)."""
    manifest = dict(store.manifest, calibration=calibration)
    write_manifest(store.path, manifest)
    store.manifest = manifest
