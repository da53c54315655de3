"""The class-independent fallback: a pooled distribution over every class's filter scores.

A class without training images has no distribution of its own. Its rows of the store hold
the pooled distribution instead: the distribution of all training images' alpha whatever their
class, i.e. the mixture of the classes' distributions weighted by their image counts. It is
computed from the per-class rows once a store is complete (an unsharded build, or the merge of
a sharded one), so both give the same bytes.

Each class's distribution of filter n is taken as the piecewise-linear CDF through its
percentile grid (``PERCENTILE_LEVELS`` at ``grid[c, :, n]``); the pooled percentiles are the
quantiles of the count-weighted mixture of those CDFs, found by bisection. The pooled mean is
the count-weighted mean of the class means (exact). The pooled β of a training image of class c
is its class β shifted by (mean_n mu_cn - mean_n mu_pooled,n), so the pooled β grid is the
quantile grid of the mixture of the shifted class β grids. A pooled row has no exemplars.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from explainserve.anomaly.summary import (BETA_LEVELS, HIGH_LEVEL, LOW_LEVEL, NO_EXEMPLAR, PERCENTILE_LEVELS,
                                          ClassSummary, class_mean_of_means)

RULE = ("count-weighted mixture of the classes' training distributions (each the piecewise-linear CDF "
        "through its percentile grid); mean exact; no exemplars")
#: Bisection steps: 2**-60 of the values' range is below float32 resolution.
BISECTION_STEPS = 60
#: Filters handled at once (bounds the (C, L, chunk) temporaries).
FILTER_CHUNK = 256


def mixture_cdf(grids: np.ndarray, levels: np.ndarray, weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mixture CDF at ``values``.

    Parameters
    ----------
    grids : np.ndarray
        (C, L, M) float64, each column non-decreasing: component c's values at ``levels``.
    levels : np.ndarray
        (L,) float64 CDF levels in [0, 1], increasing, from 0 to 1.
    weights : np.ndarray
        (C,) float64 non-negative, summing to 1.
    values : np.ndarray
        (Q, M) float64 points at which to evaluate the CDF of each of the M columns.

    Returns
    -------
    np.ndarray
        (Q, M) float64 sum_c w_c F_c(v), F_c right-continuous: 0 below grids[c, 0], 1 from
        grids[c, -1] on, linear between neighbouring grid values.
    """
    count = (grids[None] <= values[:, None, None, :]).sum(axis=2)  # (Q, C, M) grid points <= v
    last = len(levels) - 1
    upper = np.minimum(count, last)
    lower = np.maximum(count - 1, 0)
    high = np.take_along_axis(grids[None], upper[:, :, None, :], axis=2)[:, :, 0, :]
    low = np.take_along_axis(grids[None], lower[:, :, None, :], axis=2)[:, :, 0, :]
    width = high - low
    fraction = np.divide(values[:, None, :] - low, width, out=np.zeros_like(width), where=width > 0)
    inside = levels[lower] + np.clip(fraction, 0, 1) * (levels[upper] - levels[lower])
    cdf = np.where(count == 0, 0.0, np.where(count > last, 1.0, inside))
    return np.einsum("qcm,c->qm", cdf, weights)


def mixture_quantiles(grids: np.ndarray, levels: np.ndarray, weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Quantiles inf{v : F(v) >= q} of the mixture CDF (:func:`mixture_cdf`), by bisection.

    Parameters
    ----------
    grids, levels, weights
        As :func:`mixture_cdf`; ``levels`` run from 0 to 1.
    targets : np.ndarray
        (Q,) float64 levels q in [0, 1].

    Returns
    -------
    np.ndarray
        (Q, M) float64; the smallest grid value for q = 0, the largest for q = 1.
    """
    low = np.broadcast_to(grids[:, 0, :].min(axis=0), (len(targets), grids.shape[2])).copy()
    high = np.broadcast_to(grids[:, -1, :].max(axis=0), low.shape).copy()
    wanted = np.asarray(targets, dtype=np.float64)[:, None]
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        reached = mixture_cdf(grids, levels, weights, middle) >= wanted
        high = np.where(reached, middle, high)
        low = np.where(reached, low, middle)
    # The ends exactly: a rounded weight sum could put the CDF's 1 a hair below the largest value.
    return np.where(wanted <= 0, grids[:, 0, :].min(axis=0), np.where(wanted >= 1, grids[:, -1, :].max(axis=0), high))


def pooled_summary(arrays: dict, counts: np.ndarray) -> ClassSummary | None:
    """The pooled distribution of the classes with training images, as one class row.

    Parameters
    ----------
    arrays : dict of str -> np.ndarray
        The complete store's class arrays (``mean`` (C, K), ``grid`` (C, L, K), ``beta_grid``
        (C, 101), ``exemplars`` (C, K, k)).
    counts : np.ndarray
        (C,) training images per class.

    Returns
    -------
    ClassSummary or None
        None when no class has training images.
    """
    counts = np.asarray(counts, dtype=np.float64)
    held = np.flatnonzero(counts > 0)
    if not len(held):
        return None
    weights = counts[held] / counts[held].sum()
    means = np.asarray(arrays["mean"], dtype=np.float64)[held]
    mean = (weights @ means).astype(np.float32)
    levels = np.asarray(PERCENTILE_LEVELS) / 100
    grid = np.empty((len(levels), means.shape[1]), dtype=np.float64)
    class_grids = np.asarray(arrays["grid"], dtype=np.float64)[held]
    for start in range(0, means.shape[1], FILTER_CHUNK):
        chunk = slice(start, start + FILTER_CHUNK)
        grid[:, chunk] = mixture_quantiles(class_grids[:, :, chunk], levels, weights, levels)
    grid = grid.astype(np.float32)
    shift = class_mean_of_means(np.asarray(arrays["mean"])[held]) - class_mean_of_means(mean)
    beta_grids = (np.asarray(arrays["beta_grid"], dtype=np.float64)[held] + shift[:, None])[:, :, None]
    beta_grid = mixture_quantiles(beta_grids, BETA_LEVELS / 100, weights, BETA_LEVELS / 100)[:, 0]
    top_k = np.asarray(arrays["exemplars"]).shape[-1]
    return ClassSummary(mean=mean, p_low=grid[PERCENTILE_LEVELS.index(LOW_LEVEL)],
                        p_high=grid[PERCENTILE_LEVELS.index(HIGH_LEVEL)], grid=grid.astype(np.float16),
                        exemplars=np.full((means.shape[1], top_k), NO_EXEMPLAR, dtype=np.int32),
                        beta_grid=beta_grid.astype(np.float32))


def fill_pooled_rows(directory: Path, counts) -> list[int]:
    """Write the pooled distribution into the rows of the classes without training images.

    Parameters
    ----------
    directory : Path
        A complete store's folder, its class arrays written (one ``<name>.npy`` per field of
        :class:`ClassSummary`), not yet hashed.
    counts : sequence of int
        (C,) training images per class.

    Returns
    -------
    list of int
        The classes whose rows now hold the pooled distribution (empty when every class, or
        none, has training images).
    """
    counts = np.asarray(counts, dtype=np.int64)
    empty = np.flatnonzero(counts == 0)
    if not len(empty) or len(empty) == len(counts):
        return []
    arrays = {item.name: np.load(Path(directory) / f"{item.name}.npy", mmap_mode="r+") for item in fields(ClassSummary)}
    summary = pooled_summary(arrays, counts)
    for name, array in arrays.items():
        array[empty] = getattr(summary, name)
        array.flush()
    return empty.tolist()
