"""Calibrate the verdict on held-out in-distribution images: scales, tail grids, conformal ranks.

An input scored against class c meets three graded tests (larger = more anomalous):

- surprise:  sum over filters of max(0, alpha_n - P99.9_cn) / s_cn
- missing:   sum over expected filters (mu_cn above the class's mean mu) of max(0, P0.1_cn - alpha_n) / s_cn
- low_beta:  -β_z, β standardised by the class's training β median and IQR

s_cn is a robust scale of filter n on class c: how far a filter went, in its own units, not only
whether it crossed (the thesis's counts). The verdict's p-value combines the three
(:mod:`explainserve.anomaly.conformal`) and an input is ANOMALOUS exactly when it is below the
target false-positive rate.

The held-out images are split within each class they are scored against, in their order:
even positions form part A, odd positions part B (half each, no randomness).

- Part A fits the scales, s_cn = IQR of alpha_n over the part-A images of class c. Statistics
  fitted on the training images themselves are narrower than on new images (NAC-UE), so the
  training IQR is used only for a class with fewer than ``MIN_SCALE_IMAGES`` part-A images.
  Part A also fits the tail grids that put the three tests on one scale.
- Part B gives the conformal ranks; being disjoint from part A, its images are exchangeable
  with new in-distribution inputs under the fitted statistics, which is what the p-values need.
  At most ``MAX_CLASS_RANKS`` of a class's part-B images are ranked (``MAX_FALLBACK_RANKS`` in
  the class-independent group), which bounds the store.

A class whose part B holds at least ``min_class_count`` images is its own group: its tail grid
from its part A, its ranks from its part B. Every other class uses the class-independent group
(all of part A, all of part B): the statistics are in robust units and β_z, comparable across
classes. A class without training images (its store rows hold the pooled distribution of all
classes, :mod:`explainserve.anomaly.pooled`) is the ``pooled`` group: every held-out image,
whatever its class, scored against the pooled rows; scales from all of part A, tail grid from
all of part A, ranks from the first ``MAX_CLASS_RANKS`` of part B. The default minimum,
ceil(2 / target_fpr) and at least 50, leaves about two part-B images past the critical value (a
p-value is never below 1 / (n + 1)).

Use the class the server will score against (the predicted class) for the held-out images, so
the calibrated rate is the served one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from explainserve.anomaly.conformal import (STATISTICS, TESTS, critical_value, fit_tail_grid, sorted_ranks,
                                            tail_evidence)
from explainserve.anomaly.reference import ClassReference, inverse_scale
from explainserve.anomaly.store import DistributionStore, save_calibration_arrays

DEFAULT_TARGET_FPR = 0.01
SMALLEST_MIN_CLASS_COUNT = 50
#: Part-A images a class needs for its own held-out scales (an IQR settles with a few dozen).
MIN_SCALE_IMAGES = 30
#: Part-B images ranked per class and in the class-independent group, at most: the first ones
#: in order (a choice independent of their values keeps the p-values valid). Bounds the
#: serving arrays: class_ranks of 1000 classes take at most 16 MB.
MAX_CLASS_RANKS = 1000
MAX_FALLBACK_RANKS = 100_000
FALLBACK = "fallback"
POOLED = "pooled"


def default_min_class_count(target_fpr: float) -> int:
    """Part-B images a class needs for its own ranks: max(50, ceil(2 / target_fpr))."""
    return max(SMALLEST_MIN_CLASS_COUNT, math.ceil(2 / target_fpr - 1e-9))


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` fits.

    Attributes
    ----------
    section : dict
        The manifest's ``calibration`` section (JSON).
    arrays : dict of str -> np.ndarray
        ``scale`` (C, K) float32, ``tail_grid`` (C, 3, G + 2) float64 (the fallback's for
        classes on it), ``class_ranks`` (C, 4, L) float32 and ``fallback_ranks`` (4, n)
        float32 (part-B statistics sorted, +inf padded; see :mod:`~explainserve.anomaly.conformal`).
    """

    section: dict
    arrays: dict


def split_parts(classes: np.ndarray) -> np.ndarray:
    """(n,) bool, True for part B: the odd positions among the images of each class, in order."""
    part_b = np.zeros(len(classes), dtype=bool)
    for class_id in np.unique(classes):
        rows = np.flatnonzero(classes == class_id)
        part_b[rows[1::2]] = True
    return part_b


def within_class_position(classes: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """(n,) int64: each selected image's position among the selected images of its class, in order."""
    position = np.zeros(len(classes), dtype=np.int64)
    for class_id in np.unique(classes[selected]):
        rows = np.flatnonzero(selected & (classes == class_id))
        position[rows] = np.arange(len(rows))
    return position


def held_out_scales(reference: ClassReference, alpha: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, list]:
    """(C, K) float32 robust scales and, per class, ``"held-out"`` or ``"training"`` (where they came from)."""
    scale = reference.training_iqr()
    origin = ["training"] * reference.num_classes
    for class_id in range(reference.num_classes):
        # The pooled rows (classes without training images) stand for every class: all images.
        rows = alpha if reference.pooled[class_id] else alpha[classes == class_id]
        if len(rows) >= MIN_SCALE_IMAGES:
            upper, lower = np.percentile(rows.astype(np.float64), [75, 25], axis=0)
            scale[class_id] = (upper - lower).astype(np.float32)
            origin[class_id] = "held-out"
    return scale, origin


def graded_statistics(stats) -> np.ndarray:
    """(B, 3) float32 statistics of the tests in ``TESTS`` order, larger = more anomalous."""
    tests = np.empty((len(stats.beta_z), 3), dtype=np.float32)  # filled column by column: np.stack costs more
    tests[:, 0], tests[:, 1], tests[:, 2] = stats.surprise, stats.missing, -stats.beta_z
    return tests


def with_combined(tests: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """(B, 4) float32: the three tests and their combined statistic, the largest tail evidence."""
    combined = tail_evidence(tests, grids).max(axis=1)
    statistics = np.empty((len(tests), 4), dtype=np.float32)
    statistics[:, :3], statistics[:, 3] = tests, combined
    return statistics


@dataclass(frozen=True)
class PooledGroup:
    """The calibration of the pooled rows: every held-out image scored against them.

    Attributes
    ----------
    grid : np.ndarray
        (3, G + 2) float64 tail model fitted on part A.
    ranked : np.ndarray
        (n, 4) float32 statistics of the first ``MAX_CLASS_RANKS`` part-B images.
    """

    grid: np.ndarray
    ranked: np.ndarray


def pooled_group(reference: ClassReference, alpha: np.ndarray, row_sums: np.ndarray, part_b: np.ndarray,
                 scale: np.ndarray) -> PooledGroup:
    """Score every held-out image against the pooled rows (the rows of the classes without
    training images, all equal), fit the tail model on part A and keep part B's statistics.

    An input predicted as such a class is scored against the pool of all classes, so its null
    is an in-distribution image of any class scored against that pool: these images.
    """
    against_pool = np.full(len(alpha), np.flatnonzero(reference.pooled)[0], dtype=np.int64)
    tests = graded_statistics(reference.statistics(alpha, against_pool, row_sums, inverse_scale(scale)))
    grid = fit_tail_grid(tests[~part_b])
    ranked = np.flatnonzero(part_b)[:MAX_CLASS_RANKS]
    return PooledGroup(grid, with_combined(tests[ranked], np.repeat(grid[None], len(ranked), axis=0)))


def _critical(ranked: np.ndarray, count: int, target_fpr: float) -> list:
    """Critical values of the four statistics of one group; None where none can be reached (JSON)."""
    values = [critical_value(ranked[s, :count], target_fpr) for s in range(len(STATISTICS))]
    return [value if math.isfinite(value) else None for value in values]


def calibrate(store: DistributionStore, alpha: np.ndarray, classes: np.ndarray, *,
              target_fpr: float = DEFAULT_TARGET_FPR, min_class_count: int | None = None,
              scored_against: str = "predicted") -> Calibration:
    """Fit the verdict's scales, tail grids and conformal ranks on held-out in-distribution images.

    Parameters
    ----------
    store : DistributionStore
        A complete store.
    alpha : np.ndarray
        (n, K) float32 held-out filter scores, each computed for the class in ``classes``,
        in dataset order.
    classes : np.ndarray
        (n,) int class each image is scored against (the predicted class, as served).
    target_fpr : float
        Target false-positive rate in (0, 1); default 1 %.
    min_class_count : int, optional
        Part-B images a class needs for its own group, >= 1; default
        :func:`default_min_class_count`.
    scored_against : str
        Recorded in the manifest: which class the held-out images were scored against.

    Returns
    -------
    Calibration
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if min_class_count is None:
        min_class_count = default_min_class_count(target_fpr)
    if min_class_count < 1:
        raise ValueError(f"min_class_count must be >= 1, got {min_class_count}")
    reference = ClassReference(store)
    alpha, classes, row_sums = reference.check(alpha, classes)
    part_b = split_parts(classes)
    if part_b.sum() < 1 or (~part_b).sum() < 1:
        raise ValueError(f"calibration needs at least two held-out images of one class, got {len(alpha)}")
    ranked = part_b & (within_class_position(classes, part_b) < MAX_CLASS_RANKS)
    scale, scale_origin = held_out_scales(reference, alpha[~part_b], classes[~part_b])
    tests = graded_statistics(reference.statistics(alpha, classes, row_sums, inverse_scale(scale)))

    num_classes = reference.num_classes
    counts_b = np.bincount(classes[ranked], minlength=num_classes)
    own = (counts_b >= min_class_count) & ~reference.pooled
    fallback_grid = fit_tail_grid(tests[~part_b])
    grids = np.repeat(fallback_grid[None], num_classes, axis=0)
    for class_id in np.flatnonzero(own):
        grids[class_id] = fit_tail_grid(tests[~part_b & (classes == class_id)])
    statistics = with_combined(tests, grids[classes])

    pool = pooled_group(reference, alpha, row_sums, part_b, scale) if reference.pooled.any() else None
    if pool is not None:
        grids[reference.pooled] = pool.grid
        counts_b[reference.pooled] = len(pool.ranked)

    width = max([1] + counts_b[own | reference.pooled].tolist())
    class_ranks = np.full((num_classes, len(STATISTICS), width), np.inf, dtype=np.float32)
    critical = []
    for class_id in range(num_classes):
        if own[class_id]:
            class_ranks[class_id] = sorted_ranks(statistics[ranked & (classes == class_id)], width)
        elif reference.pooled[class_id]:
            class_ranks[class_id] = sorted_ranks(pool.ranked, width)
        else:
            critical.append(None)
            continue
        critical.append(_critical(class_ranks[class_id], int(counts_b[class_id]), target_fpr))
    # The fallback ranks use the fallback grid for every image, own class or not.
    fallback_rows = np.flatnonzero(part_b)[:MAX_FALLBACK_RANKS]
    fallback_statistics = with_combined(tests[fallback_rows], np.repeat(fallback_grid[None], len(fallback_rows), axis=0))
    fallback_ranks = sorted_ranks(fallback_statistics, len(fallback_statistics))
    section = {
        "target_fpr": target_fpr,
        "min_class_count": min_class_count,
        "scored_against": scored_against,
        "held_out_images": len(alpha),
        "split": {"rule": "within each class, even positions part A (scales, tail grids), odd part B (ranks)",
                  "part_a": int((~part_b).sum()), "part_b": int(part_b.sum())},
        "statistics": list(STATISTICS),
        "fallback": {"count": len(fallback_rows), "critical": _critical(fallback_ranks, fallback_ranks.shape[1], target_fpr)},
        "classes": {"count": counts_b.tolist(),
                    "source": ["class" if mine else POOLED if empty else FALLBACK
                               for mine, empty in zip(own, reference.pooled)],
                    "scale": scale_origin, "critical": critical},
    }
    arrays = {"scale": scale, "tail_grid": grids, "class_ranks": class_ranks, "fallback_ranks": fallback_ranks}
    return Calibration(section, arrays)


def save_calibration(store: DistributionStore, calibration: Calibration) -> None:
    """Write the calibration arrays into the store and record ``calibration.section`` in its
    manifest (hashed with the rest, written last)."""
    save_calibration_arrays(store, calibration.section, calibration.arrays)
