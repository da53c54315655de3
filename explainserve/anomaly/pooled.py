"""The class-independent fallback: a pooled distribution over every class's filter scores.

A class without training images has no distribution of its own. Its rows of the store hold
the pooled distribution instead: the distribution of all training images' alpha whatever their
class, i.e. the mixture of the classes' distributions weighted by their image counts. It is
computed from the per-class rows once a store is complete (an unsharded build, or the merge of
a sharded one), so both give the same bytes.

Each class's distribution of filter n is taken as the piecewise-linear CDF through its
percentile grid (``PERCENTILE_LEVELS`` at ``grid[c, :, n]``, float16: about three significant
digits); the pooled percentiles are the quantiles of the count-weighted mixture of those CDFs,
found in one sweep over their grid values (1000 classes x 2048 filters: 14-32 s and under
100 MB beside the store's arrays on a loaded 2-core machine). The pooled mean is the count-weighted mean of the class means (exact). The pooled β of a training image of class c
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
#: Filters handled at once (bounds the (chunk, 2 C L) temporaries of the sweep).
FILTER_CHUNK = 64


def mixture_quantiles(grids: np.ndarray, levels: np.ndarray, weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Quantiles inf{v : F(v) >= q} of a mixture of piecewise-linear CDFs, column by column.

    Component c's CDF F_c is 0 below ``grids[c, 0]``, reaches ``levels[l]`` at ``grids[c, l]``
    and is linear between neighbouring grid values (a jump where two are equal);
    F = sum_c w_c F_c. F is swept once in order of all the components' grid values: each
    segment adds its slope w_c (level step) / (width) where it starts and removes it where it
    ends, so F at every grid value is a cumulative sum (O(C L log(C L)) per column, not C^2 L).

    Parameters
    ----------
    grids : np.ndarray
        (C, L, M) float64, each column non-decreasing along L.
    levels : np.ndarray
        (L,) float64 CDF levels, increasing from 0 to 1.
    weights : np.ndarray
        (C,) float64 non-negative, summing to 1.
    targets : np.ndarray
        (Q,) float64 levels q in [0, 1].

    Returns
    -------
    np.ndarray
        (Q, M) float64; the smallest grid value for q <= 0, the largest for q >= 1.
    """
    rows = np.ascontiguousarray(np.moveaxis(grids, 2, 0))  # (M, C, L): one sweep per contiguous row
    start, stop = rows[:, :, :-1], rows[:, :, 1:]
    mass = np.broadcast_to(weights[None, :, None] * np.diff(levels)[None, None, :], start.shape)
    width = stop - start
    tie = width <= 0
    slope = np.where(tie, 0.0, mass / np.where(tie, 1.0, width))
    columns = len(rows)
    order = np.argsort(np.concatenate([start, stop], axis=1).reshape(columns, -1), axis=1, kind="stable")

    def swept(first_half, second_half):
        return np.take_along_axis(np.concatenate([first_half, second_half], axis=1).reshape(columns, -1), order, axis=1)

    positions = swept(start, stop)
    slope_before = np.cumsum(swept(slope, -slope), axis=1)
    slope_before = np.concatenate([np.zeros((columns, 1)), slope_before[:, :-1]], axis=1)
    slope_before = np.maximum(slope_before, 0.0)  # a rounding residue of +s - s, never a real slope
    jump = swept(np.where(tie, mass, 0.0), np.zeros(start.shape))
    step = np.diff(positions, axis=1, prepend=positions[:, :1])
    before_jump = np.cumsum(slope_before * step + jump, axis=1) - jump  # F just before each grid value
    after = np.maximum.accumulate(before_jump + jump, axis=1)  # F at each grid value

    wanted = np.asarray(targets, dtype=np.float64)
    row = np.arange(columns)[:, None]
    first = np.minimum((after[:, None, :] < wanted[None, :, None]).sum(axis=2), positions.shape[1] - 1)  # (M, Q)
    previous = np.maximum(first - 1, 0)
    at, from_value = positions[row, first], positions[row, previous]
    from_level = np.where(first > 0, after[row, previous], 0.0)
    rate = slope_before[row, first]
    reached = before_jump[row, first] >= wanted[None, :]  # on the slope, not at the jump
    along = from_value + np.divide(wanted[None, :] - from_level, rate, out=np.zeros_like(rate), where=rate > 0)
    quantiles = np.where(reached & (first > 0), np.minimum(along, at), at).T
    # The ends exactly: a rounded weight sum could put the CDF's 1 a hair below the largest value.
    low, high = grids[:, 0, :].min(axis=0), grids[:, -1, :].max(axis=0)
    return np.where(wanted[:, None] <= 0, low, np.where(wanted[:, None] >= 1, high, quantiles))


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
    class_grids = np.asarray(arrays["grid"])[held]  # float16, widened one chunk at a time
    for start in range(0, means.shape[1], FILTER_CHUNK):
        chunk = class_grids[:, :, start:start + FILTER_CHUNK].astype(np.float64)
        grid[:, start:start + FILTER_CHUNK] = mixture_quantiles(chunk, levels, weights, levels)
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
