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

Given the images' pooled features as well, the calibration also holds a *feature block*, for
clients that send features with alpha: the two feature tests
(:mod:`explainserve.anomaly.feature_tests`) fitted on part A, then the five tests (the three
above, feature_mahalanobis, feature_residual) calibrated exactly as the three are, in the same
groups: tail grids of the five on part A, their min-p combination ``combined5``, and the part-B
ranks of feature_mahalanobis, feature_residual and combined5 (the three alpha tests' own ranks
are the alpha calibration's). A class without training images takes the mean of all part-A
features, as its alpha rows hold the pool of all classes. The alpha-only calibration is the
same with or without features, so a client that sends alpha alone still gets an exact verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from explainserve.anomaly.conformal import (FEATURE_STATISTICS, FIVE_TESTS, STATISTICS, TESTS, critical_value,
                                            fit_tail_grid, sorted_ranks, tail_evidence)
from explainserve.anomaly.feature_tests import FeatureTests
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
    """The T tests and their combined statistic, the largest tail evidence.

    Parameters
    ----------
    tests : np.ndarray
        (B, T) statistics, larger = more anomalous.
    grids : np.ndarray
        (B, T, G + 2) the tail model of each row's group (:func:`~explainserve.anomaly.conformal.fit_tail_grid`).

    Returns
    -------
    np.ndarray
        (B, T + 1) float32.
    """
    combined = tail_evidence(tests, grids).max(axis=1)
    statistics = np.empty((len(tests), tests.shape[1] + 1), dtype=np.float32)
    statistics[:, :-1], statistics[:, -1] = tests, combined
    return statistics


@dataclass(frozen=True)
class GroupCalibration:
    """Tail grids and conformal ranks of one set of tests in every group.

    Attributes
    ----------
    grids : np.ndarray
        (C, T, G + 2) float64 part-A tail model of each class's group.
    class_ranks : np.ndarray
        (C, S, L) float32 sorted part-B statistics of the classes ranked on their own (own
        classes and pooled classes), +inf padded.
    counts : np.ndarray
        (C,) int64 part-B images ranked in each class's own row.
    critical : list
        Per class, the S critical values of its own row (None for a class on the fallback).
    fallback_ranks : np.ndarray
        (S, n) float32 sorted part-B statistics of the class-independent group.
    fallback_critical : list
        Its S critical values.
    """

    grids: np.ndarray
    class_ranks: np.ndarray
    counts: np.ndarray
    critical: list
    fallback_ranks: np.ndarray
    fallback_critical: list


def calibrate_groups(tests: np.ndarray, classes: np.ndarray, part_b: np.ndarray, ranked: np.ndarray,
                     own: np.ndarray, pooled: np.ndarray, pooled_tests: np.ndarray | None, columns: list,
                     target_fpr: float) -> GroupCalibration:
    """Fit the tail grids of T tests on part A and rank part B, in each group.

    Parameters
    ----------
    tests : np.ndarray
        (n, T) float32 statistics of the held-out images, each against its class.
    classes : np.ndarray
        (n,) int class each is scored against.
    part_b, ranked : np.ndarray
        (n,) bool, the part-B images and the part-B images ranked in their class's row.
    own, pooled : np.ndarray
        (C,) bool classes ranked on their own images, and classes without training images.
    pooled_tests : np.ndarray or None
        (n, T) float32 statistics of every held-out image scored against the pooled rows
        (None when no class is pooled): the pooled group's null, an in-distribution image of
        any class scored against the pool of all classes.
    columns : list of int
        Which of the T + 1 statistics (the tests, then the combined one) are ranked: S of them.
    target_fpr : float

    Returns
    -------
    GroupCalibration
    """
    num_classes = len(own)
    fallback_grid = fit_tail_grid(tests[~part_b])
    grids = np.repeat(fallback_grid[None], num_classes, axis=0)
    for class_id in np.flatnonzero(own):
        grids[class_id] = fit_tail_grid(tests[~part_b & (classes == class_id)])
    statistics = with_combined(tests, grids[classes])[:, columns]
    counts = np.bincount(classes[ranked], minlength=num_classes)

    if pooled_tests is not None:
        pool_grid = fit_tail_grid(pooled_tests[~part_b])
        pool_rows = np.flatnonzero(part_b)[:MAX_CLASS_RANKS]
        pool_ranked = with_combined(pooled_tests[pool_rows], np.repeat(pool_grid[None], len(pool_rows), axis=0))[:, columns]
        grids[pooled] = pool_grid
        counts[pooled] = len(pool_rows)

    width = max([1] + counts[own | pooled].tolist())
    class_ranks = np.full((num_classes, len(columns), width), np.inf, dtype=np.float32)
    critical = []
    for class_id in range(num_classes):
        if own[class_id]:
            class_ranks[class_id] = sorted_ranks(statistics[ranked & (classes == class_id)], width)
        elif pooled[class_id]:
            class_ranks[class_id] = sorted_ranks(pool_ranked, width)
        else:
            critical.append(None)
            continue
        critical.append(_critical(class_ranks[class_id], int(counts[class_id]), target_fpr))
    # The fallback ranks use the fallback grid for every image, own class or not.
    fallback_rows = np.flatnonzero(part_b)[:MAX_FALLBACK_RANKS]
    fallback_statistics = with_combined(tests[fallback_rows], np.repeat(fallback_grid[None], len(fallback_rows), axis=0))
    fallback_ranks = sorted_ranks(fallback_statistics[:, columns], len(fallback_rows))
    return GroupCalibration(grids, class_ranks, counts, critical, fallback_ranks,
                            _critical(fallback_ranks, fallback_ranks.shape[1], target_fpr))


def _critical(ranked: np.ndarray, count: int, target_fpr: float) -> list:
    """Critical values of the ranked statistics of one group; None where none can be reached (JSON)."""
    values = [critical_value(ranked[s, :count], target_fpr) for s in range(len(ranked))]
    return [value if math.isfinite(value) else None for value in values]


def check_features(features, count: int, num_features: int) -> np.ndarray:
    """``features`` as (count, K) float32, or ValueError naming ``features``.

    Parameters
    ----------
    features : array-like
        (count, K) pooled features; (K,) when count is 1.
    count : int
        B, the rows of the alpha they go with.
    num_features : int
        K, the store's filter count.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 1 and count == 1:
        features = features[None]
    if features.ndim != 2 or features.shape != (count, num_features):
        raise ValueError(f"features must be ({count}, {num_features}) pooled features (one row per alpha row, "
                         f"one value per filter), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features must be finite (no NaN or infinity)")
    return features


def calibrate(store: DistributionStore, alpha: np.ndarray, classes: np.ndarray, *,
              features: np.ndarray | None = None, target_fpr: float = DEFAULT_TARGET_FPR, min_class_count: int | None = None,
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
    features : np.ndarray, optional
        (n, K) float32 pooled features of the same images (the target layer's activations
        averaged over positions). With them the calibration also holds the feature block: the
        :class:`~explainserve.anomaly.feature_tests.FeatureTests` fitted on part A and the
        five-test verdict's tail grids and ranks (module docstring).
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
    if features is not None:
        features = check_features(features, len(alpha), store.meta.num_filters)
    part_b = split_parts(classes)
    if part_b.sum() < 1 or (~part_b).sum() < 1:
        raise ValueError(f"calibration needs at least two held-out images of one class, got {len(alpha)}")
    ranked = part_b & (within_class_position(classes, part_b) < MAX_CLASS_RANKS)
    scale, scale_origin = held_out_scales(reference, alpha[~part_b], classes[~part_b])
    inverse = inverse_scale(scale)
    tests = graded_statistics(reference.statistics(alpha, classes, row_sums, inverse))
    num_classes, pooled = reference.num_classes, reference.pooled
    counts_b = np.bincount(classes[ranked], minlength=num_classes)
    own = (counts_b >= min_class_count) & ~pooled
    # Every held-out image scored against the pooled rows (all equal): the pooled group's null.
    against_pool = np.full(len(alpha), np.flatnonzero(pooled)[0], dtype=np.int64) if pooled.any() else None
    pooled_tests = (graded_statistics(reference.statistics(alpha, against_pool, row_sums, inverse))
                    if pooled.any() else None)
    groups = calibrate_groups(tests, classes, part_b, ranked, own, pooled, pooled_tests,
                              list(range(len(STATISTICS))), target_fpr)
    section = {
        "target_fpr": target_fpr,
        "min_class_count": min_class_count,
        "scored_against": scored_against,
        "held_out_images": len(alpha),
        "split": {"rule": "within each class, even positions part A (scales, tail grids), odd part B (ranks)",
                  "part_a": int((~part_b).sum()), "part_b": int(part_b.sum())},
        "statistics": list(STATISTICS),
        "fallback": {"count": groups.fallback_ranks.shape[1], "critical": groups.fallback_critical},
        "classes": {"count": groups.counts.tolist(),
                    "source": ["class" if mine else POOLED if empty else FALLBACK for mine, empty in zip(own, pooled)],
                    "scale": scale_origin, "critical": groups.critical},
    }
    arrays = {"scale": scale, "tail_grid": groups.grids, "class_ranks": groups.class_ranks,
              "fallback_ranks": groups.fallback_ranks}
    if features is not None:
        block, section["features"] = feature_block(features, tests, pooled_tests, classes, part_b, ranked, own,
                                                   pooled, against_pool, target_fpr)
        arrays.update(block)
    return Calibration(section, arrays)


def feature_block(features: np.ndarray, tests: np.ndarray, pooled_tests: np.ndarray | None, classes: np.ndarray,
                  part_b: np.ndarray, ranked: np.ndarray, own: np.ndarray, pooled: np.ndarray,
                  against_pool: np.ndarray | None, target_fpr: float) -> tuple[dict, dict]:
    """The feature tests fitted on part A, and the five-test verdict's tail grids and ranks in
    the alpha calibration's groups.

    Parameters
    ----------
    features : np.ndarray
        (n, K) float32 pooled features of the held-out images.
    tests, pooled_tests : np.ndarray
        (n, 3) float32 alpha tests against each image's class, and against the pooled rows (or None).
    classes, part_b, ranked, own, pooled, target_fpr
        As in :func:`calibrate_groups`.
    against_pool : np.ndarray or None
        (n,) int64 a pooled class for every image (None when no class is pooled).

    Returns
    -------
    (dict, dict)
        The ``FEATURE_ARRAYS`` (store names) and the calibration section's ``features`` entry.
    """
    fitted = FeatureTests(features[~part_b], classes[~part_b], len(own), shared=pooled)
    five = np.concatenate([tests, fitted.statistics(features, classes).astype(np.float32)], axis=1)
    pooled_five = (np.concatenate([pooled_tests, fitted.statistics(features, against_pool).astype(np.float32)], axis=1)
                   if pooled_tests is not None else None)
    ranked_columns = list(range(len(TESTS), len(FIVE_TESTS) + 1))  # the feature tests and the combined statistic
    groups = calibrate_groups(five, classes, part_b, ranked, own, pooled, pooled_five, ranked_columns, target_fpr)
    arrays = {f"feature_{name}": array for name, array in fitted.arrays().items()}
    arrays.update(feature_tail_grid=groups.grids, feature_class_ranks=groups.class_ranks,
                  feature_fallback_ranks=groups.fallback_ranks)
    section = {"tests": list(FIVE_TESTS), "statistics": list(FEATURE_STATISTICS), "num_features": fitted.num_features,
               "mahalanobis_rank": fitted.mahalanobis_basis.shape[1], "residual_dimensions": fitted.basis.shape[1],
               "fit": "part A: class means, tied covariance, principal directions",
               "fallback": {"count": groups.fallback_ranks.shape[1], "critical": groups.fallback_critical},
               "classes": {"critical": groups.critical}}
    return arrays, section


def save_calibration(store: DistributionStore, calibration: Calibration) -> None:
    """Write the calibration arrays into the store and record ``calibration.section`` in its
    manifest (hashed with the rest, written last)."""
    save_calibration_arrays(store, calibration.section, calibration.arrays)


def classes_never_anomalous(section: dict) -> dict[int, list[int]]:
    """The classes whose verdict can never be ANOMALOUS at the calibrated target rate.

    A p-value is never below 1 / (n + 1) for a group that ranks n part-B images
    (:func:`~explainserve.anomaly.conformal.interpolated_p_values`), so a group with
    (n + 1) x target_fpr <= 1 cannot reach the target: its combined statistic has no critical
    value (None in the section). Too few validation images make that silent otherwise: every
    verdict of those classes is NORMAL, whatever the input.

    Parameters
    ----------
    section : dict
        A calibration section (the store manifest's ``calibration``).

    Returns
    -------
    dict
        n (the part-B images the group ranks) -> ascending ids of the classes scored in that
        group; empty when every class can be flagged.
    """
    classes, fallback = section["classes"], section["fallback"]
    never: dict[int, list[int]] = {}
    for class_id, (source, critical) in enumerate(zip(classes["source"], classes["critical"])):
        count = classes["count"][class_id]
        if source == FALLBACK:
            critical, count = fallback["critical"], fallback["count"]
        if critical[-1] is None:  # the combined statistic, the verdict's
            never.setdefault(count, []).append(class_id)
    return never


def never_anomalous_warning(section: dict, class_names: list[str]) -> str | None:
    """One paragraph for a user: which classes :func:`classes_never_anomalous` finds, why, and
    the two ways out (more validation images, or a larger target rate); None when there are none.

    Parameters
    ----------
    section : dict
        A calibration section.
    class_names : list of str
        The store's class names, by id.
    """
    never = classes_never_anomalous(section)
    if not never:
        return None
    target = section["target_fpr"]
    needed = math.floor(1 / target - 1) + 1  # the smallest n with (n + 1) x target > 1
    silent = sorted(class_id for ids in never.values() for class_id in ids)
    shown = ", ".join(class_names[class_id] for class_id in silent[:10]) + (", ..." if len(silent) > 10 else "")
    ranked = " or ".join(str(count) for count in sorted(never))
    return (f"the verdict can never be ANOMALOUS at the {target:.2%} target for {len(silent)} of "
            f"{len(section['classes']['source'])} classes ({shown}): their groups rank only {ranked} part-B "
            f"validation samples, and a p-value is never below 1/(n + 1) ({1 / (min(never) + 1):.2%} for "
            f"{min(never)}). A group reaches {target:.2%} from {needed} ranked samples on (half of the validation "
            f"samples are ranked): give more validation samples, or calibrate to a target above "
            f"{1 / (min(never) + 1):.2%}")
