"""Per-class summary of training Grad-AMap scores: mean, exact percentiles, exemplars, β.

One call summarises one class from all of its training alpha vectors at once, so memory is
bounded by one class's values. Every number is computed with deterministic numpy reductions,
so the same class data gives the same bytes whichever shard computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Percentile grid kept per (class, filter), in percent. P0.1 and P99.9 are the thesis's
#: expectation and surprise thresholds; the rest lets other thresholds be chosen later.
PERCENTILE_LEVELS = (0.0, 0.1, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9, 100.0)
LOW_LEVEL = 0.1
HIGH_LEVEL = 99.9

#: Percentiles 0, 1, ..., 100 of the class's training β distribution.
BETA_LEVELS = np.arange(101, dtype=np.float64)

#: Exemplar slot value when a class has fewer than ``top_k`` training images.
NO_EXEMPLAR = -1


@dataclass(frozen=True)
class ClassSummary:
    """Training distribution of one class.

    Attributes
    ----------
    mean : np.ndarray
        (K,) float32, mu_cn, the mean alpha of each filter.
    p_low, p_high : np.ndarray
        (K,) float32, the exact P0.1 and P99.9 of each filter.
    grid : np.ndarray
        (L, K) float16, the percentiles at ``PERCENTILE_LEVELS``.
    exemplars : np.ndarray
        (K, top_k) int32, ids of the training images with the highest alpha per filter,
        best first (ties broken by the smaller id), padded with ``NO_EXEMPLAR``.
    beta_grid : np.ndarray
        (101,) float32, percentiles 0..100 of the class's training β.
    """

    mean: np.ndarray
    p_low: np.ndarray
    p_high: np.ndarray
    grid: np.ndarray
    exemplars: np.ndarray
    beta_grid: np.ndarray


def class_mean_of_means(mean: np.ndarray) -> np.ndarray:
    """Mean over filters of mu_cn, in float64.

    Parameters
    ----------
    mean : np.ndarray
        (..., K) float32 per-filter means.

    Returns
    -------
    np.ndarray
        (...,) float64. β = mean_n(alpha_n) - this value (eq. 6.8 rearranged).
    """
    return np.asarray(mean, dtype=np.float64).mean(axis=-1)


def row_sums_of(alpha: np.ndarray) -> np.ndarray:
    """(B,) float32 row sums of (B, K) float32 ``alpha``: float32 pairwise sums (numpy's
    contiguous reduction), fast, and deterministic whatever the batch, which keeps sharded
    builds byte-identical."""
    return alpha.sum(axis=1, dtype=np.float32)


def beta_scores(alpha: np.ndarray, mean_of_means: np.ndarray, row_sums: np.ndarray | None = None) -> np.ndarray:
    """β = mean over n of (alpha_n - mu_cn), thesis eq. 6.8.

    Parameters
    ----------
    alpha : np.ndarray
        (B, K) float32 filter scores, C-contiguous.
    mean_of_means : np.ndarray
        (B,) or scalar float64, :func:`class_mean_of_means` of each row's class.
    row_sums : np.ndarray, optional
        (B,) float32 :func:`row_sums_of` ``alpha``, when already computed.

    Returns
    -------
    np.ndarray
        (B,) float64 β. Build and scoring share this function so the training β
        distribution and a served β are computed the same way.
    """
    row_sums = row_sums_of(alpha) if row_sums is None else row_sums
    return row_sums.astype(np.float64) / alpha.shape[1] - mean_of_means


def top_exemplars(values: np.ndarray, image_ids: np.ndarray, top_k: int) -> np.ndarray:
    """Ids of the images with the highest alpha per filter, ties going to the smaller id.

    Linear in N (a partition and a few passes, no per-filter sort), because ties are common:
    a filter that never fires has alpha exactly 0 for every image.

    Parameters
    ----------
    values : np.ndarray
        (N, K) float32 alpha.
    image_ids : np.ndarray
        (N,) int64 distinct ids.
    top_k : int

    Returns
    -------
    np.ndarray
        (K, min(top_k, N)) int64 ids, best first.
    """
    count, num_filters = values.shape
    kept = min(top_k, count)
    by_id = np.argsort(image_ids, kind="stable")
    values, image_ids = values[by_id], image_ids[by_id]
    kth = -np.partition(-values, kept - 1, axis=0)[kept - 1]
    above = values > kth
    tied = values == kth
    # Among the values tied with the k-th largest, keep the first (smallest-id) ones needed.
    needed = kept - above.sum(axis=0)
    chosen = above | (tied & (np.cumsum(tied, axis=0, dtype=np.int32) <= needed))
    rows = np.nonzero(chosen.T)[1].reshape(num_filters, kept)
    chosen_values = values[rows, np.arange(num_filters)[:, None]]
    chosen_ids = image_ids[rows]
    order = np.lexsort((chosen_ids, -chosen_values), axis=1)
    return np.take_along_axis(chosen_ids, order, axis=1)


def summarise_class(values: np.ndarray, image_ids: np.ndarray, top_k: int) -> ClassSummary:
    """Summarise one class's training alpha vectors.

    Parameters
    ----------
    values : np.ndarray
        (N, K) float32 alpha of the N training images of the class, N >= 1.
    image_ids : np.ndarray
        (N,) int ids of those images.
    top_k : int
        Exemplars kept per filter.

    Returns
    -------
    ClassSummary

    Raises
    ------
    ValueError
        If a percentile does not fit in float16 (|value| > 65504).
    """
    values = np.asarray(values, dtype=np.float32)
    count, num_filters = values.shape
    mean = values.mean(axis=0, dtype=np.float64).astype(np.float32)
    # Interpolate in float64, then round once: the float32 result is the exact percentile rounded.
    grid = np.percentile(values.astype(np.float64), PERCENTILE_LEVELS, axis=0).astype(np.float32)
    largest = float(np.abs(grid).max())
    if largest > float(np.finfo(np.float16).max):
        raise ValueError(
            f"a training percentile of {largest:g} does not fit the float16 grid "
            "(|value| <= 65504); rescale the model's logits"
        )
    p_low = grid[PERCENTILE_LEVELS.index(LOW_LEVEL)]
    p_high = grid[PERCENTILE_LEVELS.index(HIGH_LEVEL)]

    exemplars = np.full((num_filters, top_k), NO_EXEMPLAR, dtype=np.int32)
    exemplars[:, :min(top_k, count)] = top_exemplars(values, np.asarray(image_ids, dtype=np.int64), top_k)

    betas = beta_scores(values, class_mean_of_means(mean))
    beta_grid = np.percentile(betas, BETA_LEVELS).astype(np.float32)
    return ClassSummary(mean, p_low, p_high, grid.astype(np.float16), exemplars, beta_grid)
