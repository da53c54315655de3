"""Per-input statistics against a class's training distribution: flags, graded exceedances and β.

Both calibration and serving compute these with the same code, so the p-values are
calibrated on exactly the numbers they are later applied to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from explainserve.anomaly.conformal import order_keys
from explainserve.anomaly.store import DistributionStore
from explainserve.anomaly.summary import BETA_LEVELS, PERCENTILE_LEVELS, beta_scores, class_mean_of_means, row_sums_of

#: A (class, filter) scale is at least this fraction of the class's median positive scale: a
#: filter that is constant on the held-out images (a silent one, IQR 0) would otherwise weigh
#: without bound, or, were the floor 0, not at all.
SCALE_FLOOR = 0.1


def inverse_scale(scale: np.ndarray) -> np.ndarray:
    """(C, K) float32 1 / max(s_cn, SCALE_FLOOR x the median of the class's positive scales).

    A class without a positive scale (most filters silent on few images, or no images) takes
    the median positive scale of all classes, and 1.0 when there is none at all.
    """
    scale = np.nan_to_num(np.asarray(scale, dtype=np.float32), nan=0.0)
    positive = np.where(scale > 0, scale, np.nan)
    with warnings.catch_warnings():  # a row without a positive scale: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(positive, axis=1, keepdims=True)
    overall = float(np.median(scale[scale > 0])) if (scale > 0).any() else 1.0
    floor = SCALE_FLOOR * np.where(np.isnan(median), overall, median)
    return (1.0 / np.maximum(scale, floor)).astype(np.float32)


@dataclass(frozen=True)
class Flags:
    """The flagged (row, filter) entries of a batch of B rows of K filters, sparse.

    Attributes
    ----------
    entries : np.ndarray
        (M,) int64 flat indices row * K + filter, ascending: row by row, filters in order.
    starts : np.ndarray
        (B + 1,) int64: row i's entries are ``entries[starts[i]:starts[i + 1]]``.
    exceedance : np.ndarray
        (M,) float32 |alpha_n - threshold_cn| / s_cn of each entry, in robust units of its
        (class, filter); 0 without scales.
    num_filters : int
        K.
    count : np.ndarray
        (B,) int64 flagged filters per row (derived from ``starts``).
    """

    entries: np.ndarray
    starts: np.ndarray
    exceedance: np.ndarray
    num_filters: int
    count: np.ndarray = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "count", self.starts[1:] - self.starts[:-1])  # np.diff's work, without its overhead

    def filters(self, row: int) -> np.ndarray:
        """(m,) int64 flagged filters of ``row``, ascending."""
        return self.entries[self.starts[row]:self.starts[row + 1]] - row * self.num_filters

    def row_exceedance(self, row: int) -> np.ndarray:
        """(m,) float32 exceedances of ``row``'s flagged filters, in :meth:`filters` order."""
        return self.exceedance[self.starts[row]:self.starts[row + 1]]

    def mask(self) -> np.ndarray:
        """(B, K) bool, True where flagged."""
        mask = np.zeros((len(self.starts) - 1) * self.num_filters, dtype=bool)
        mask[self.entries] = True
        return mask.reshape(-1, self.num_filters)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most extreme flags of every row, largest exceedance first (ties: lower filter).

        Returns
        -------
        (np.ndarray, np.ndarray)
            (B, k) int32 filters, padded with -1, and (B, k) float32 exceedances, padded with 0.
        """
        rows = len(self.starts) - 1
        filters = np.full((rows, k), -1, dtype=np.int32)
        exceedance = np.zeros((rows, k), dtype=np.float32)
        if k == 0 or not len(self.entries):
            return filters, exceedance
        row_of = np.arange(rows).repeat(self.count)
        if k == 1:  # the columnar default: each row's first largest, without sorting every entry
            chosen = self._first_largest(row_of)
            filters[row_of[chosen], 0] = self.entries[chosen] - row_of[chosen] * self.num_filters
            exceedance[row_of[chosen], 0] = self.exceedance[chosen]
            return filters, exceedance
        # By row, then exceedance, largest first; a stable sort keeps ties in filter order.
        keys = (row_of.astype(np.uint64) << np.uint64(32)) | order_keys(-self.exceedance)
        order = keys.argsort(kind="stable")
        rank = np.arange(len(order)) - self.starts[row_of]  # position within its row (rows stay grouped)
        kept = rank < k
        chosen = order[kept]
        filters[row_of[kept], rank[kept]] = self.entries[chosen] - row_of[kept] * self.num_filters
        exceedance[row_of[kept], rank[kept]] = self.exceedance[chosen]
        return filters, exceedance

    def _first_largest(self, row_of: np.ndarray) -> np.ndarray:
        """(r,) positions in ``entries`` of each flagged row's largest exceedance, the lowest
        filter among equals: the entry :meth:`top` sorts first (compared as its order keys)."""
        keys = order_keys(-self.exceedance)
        flagged_rows = self.count > 0
        least = np.minimum.reduceat(keys, self.starts[:-1][flagged_rows])
        smallest_of_row = np.zeros(len(self.count), dtype=np.uint64)
        smallest_of_row[flagged_rows] = least
        candidates = np.flatnonzero(keys == smallest_of_row[row_of])  # ascending: rows, then filters
        first = np.ones(len(candidates), dtype=bool)
        first[1:] = row_of[candidates[1:]] != row_of[candidates[:-1]]
        return candidates[first]


def flagged(upper: np.ndarray, lower: np.ndarray, classes: np.ndarray, inverse: np.ndarray | None) -> tuple[Flags, np.ndarray]:
    """The flags where ``upper > lower`` and the per-row sums of their exceedances.

    Parameters
    ----------
    upper, lower : np.ndarray
        (B, K) float32: alpha and the gathered P99.9 (surprise), or the gathered P0.1 and alpha
        (missing); a filter is flagged where upper > lower, ``upper - lower`` past its threshold.
    classes : np.ndarray
        (B,) int64 class of each row (picks the row of ``inverse``).
    inverse : np.ndarray or None
        (C, K) float32 inverse robust scales; None: every exceedance 0.

    Returns
    -------
    (Flags, np.ndarray)
        The flags and (B,) float32 sums of their exceedances. Each row's sum runs over its own
        entries in filter order (float64), so it is the same whatever else is in the batch.
    """
    rows, num_filters = upper.shape
    entries = (upper > lower).ravel().nonzero()[0]  # np.flatnonzero's work; several times faster than a 2-D nonzero
    starts = entries.searchsorted(np.arange(rows + 1) * num_filters)
    if inverse is None:
        return Flags(entries, starts, np.zeros(len(entries), np.float32), num_filters), np.zeros(rows, np.float32)
    # Flat index of (class, filter) in `inverse`: the entry moved from its row to its class's.
    count = starts[1:] - starts[:-1]
    shift = ((classes - np.arange(rows)) * num_filters).repeat(count)
    exceedance = (upper.ravel()[entries] - lower.ravel()[entries]) * inverse.ravel()[entries + shift]
    flags = Flags(entries, starts, exceedance, num_filters)
    sums = np.zeros(rows, dtype=np.float32)
    if len(entries):
        present = count > 0
        sums[present] = np.add.reduceat(exceedance, starts[:-1][present], dtype=np.float64)
    return flags, sums


@dataclass(frozen=True)
class FilterStatistics:
    """Statistics of B alpha vectors, each against its own class.

    Attributes
    ----------
    surprising : Flags
        alpha_n > P99.9_cn, exceedance (alpha_n - P99.9_cn) / s_cn.
    expected_missing : Flags
        alpha_n < P0.1_cn and mu_cn > mean_n(mu_cn), exceedance (P0.1_cn - alpha_n) / s_cn.
    surprise_count, expectation_count : np.ndarray
        (B,) int64 flagged filters per row.
    surprise : np.ndarray
        (B,) float32, sum of the surprising filters' exceedances, with s_cn the robust scale of
        (class, filter) fitted on held-out images (0 without a scale).
    missing : np.ndarray
        (B,) float32, sum of the expected-but-missing filters' exceedances.
    beta : np.ndarray
        (B,) float64, mean_n(alpha_n - mu_cn).
    beta_percentile : np.ndarray
        (B,) float64 in [0, 100], β's percentile within the class's training β.
    beta_z : np.ndarray
        (B,) float64, (β - median) / IQR of the class's training β; comparable across classes.
    """

    surprising: Flags
    expected_missing: Flags
    surprise_count: np.ndarray
    expectation_count: np.ndarray
    surprise: np.ndarray
    missing: np.ndarray
    beta: np.ndarray
    beta_percentile: np.ndarray
    beta_z: np.ndarray


def percentile_in_grid(values: np.ndarray, grids: np.ndarray, levels: np.ndarray = BETA_LEVELS) -> np.ndarray:
    """Row-wise ``np.interp(values[i], grids[i], levels)``, vectorised.

    Parameters
    ----------
    values : np.ndarray
        (B,) values.
    grids : np.ndarray
        (B, G) non-decreasing percentile values at ``levels``.
    levels : np.ndarray
        (G,) percent levels.

    Returns
    -------
    np.ndarray
        (B,) float64 percentiles, clipped to [levels[0], levels[-1]].
    """
    grids = np.asarray(grids, dtype=np.float64)
    above = np.minimum(np.maximum((grids <= values[:, None]).sum(axis=1), 1), grids.shape[1] - 1)
    flat = grids.ravel()
    high_at = np.arange(len(grids)) * grids.shape[1] + above
    low, high = flat[high_at - 1], flat[high_at]
    width = high - low
    fraction = np.divide(values - low, width, out=(values >= high).astype(np.float64), where=width > 0)
    percent = levels[above - 1] + fraction * (levels[above] - levels[above - 1])
    return np.minimum(np.maximum(percent, levels[0]), levels[-1])


class ClassReference:
    """The parts of a store that scoring reads, prepared once at load time.

    Parameters
    ----------
    store : DistributionStore
        A complete (not shard) store.

    Notes
    -----
    The expectation test folds the mu condition into its threshold: filters with
    mu_cn <= mean_n(mu_cn) get a threshold of -inf, so one comparison does both tests.
    The graded statistics need the robust scales of a calibrated store (``scale`` array);
    calibration, which fits them, passes them to :meth:`statistics` instead.
    """

    def __init__(self, store: DistributionStore):
        if "shard" in store.manifest:
            raise ValueError(f"distribution store {store.path} is one shard; merge the shards before scoring")
        self.store = store
        self.num_classes = store.num_classes
        self.num_filters = store.meta.num_filters
        self.counts = store.counts
        mean = np.asarray(store.arrays["mean"])
        self.mean_of_means = class_mean_of_means(mean)
        # A class without training images scores against the pooled rows the build wrote for
        # it; a store without them (a shard, or an older build) has NaN rows there.
        self.scorable = np.isfinite(self.mean_of_means)
        self.pooled = (self.counts == 0) & self.scorable
        # Plain ndarray views of the memory maps: np.memmap indexing costs tens of microseconds.
        self.p_high = store.arrays["p_high"].view(np.ndarray)
        self.p_low = store.arrays["p_low"].view(np.ndarray)
        self.p_low_expected = np.where(mean > self.mean_of_means[:, None], self.p_low, -np.inf).astype(np.float32)
        self.exemplars = store.arrays["exemplars"].view(np.ndarray)
        self.beta_grid = np.array(store.arrays["beta_grid"], dtype=np.float64)
        self.beta_median = self.beta_grid[:, 50]
        spread = self.beta_grid[:, 75] - self.beta_grid[:, 25]
        self.beta_scale = np.where(spread > 0, spread, 1.0)
        self.inverse_scale = None
        if "scale" in store.arrays:
            self.inverse_scale = inverse_scale(store.arrays["scale"])

    def training_iqr(self) -> np.ndarray:
        """(C, K) float32 P75 - P25 of each (class, filter) on the training images."""
        grid = np.asarray(self.store.arrays["grid"], dtype=np.float32)
        return grid[:, PERCENTILE_LEVELS.index(75.0)] - grid[:, PERCENTILE_LEVELS.index(25.0)]

    def check(self, alpha, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate scoring input.

        Parameters
        ----------
        alpha : array-like
            (B, K) or (K,) filter scores.
        classes : array-like
            (B,) or scalar class ids.

        Returns
        -------
        (np.ndarray, np.ndarray, np.ndarray)
            alpha (B, K) float32, classes (B,) int64 and the (B,) float32 row sums of alpha,
            which :meth:`statistics` reuses for β.

        Raises
        ------
        ValueError
            Wrong alpha length or shape, NaN or infinite alpha, a class id outside
            [0, C), or a class without any distribution (no training images and no pooled
            rows).
        """
        alpha = np.ascontiguousarray(alpha, dtype=np.float32)
        if alpha.ndim == 1:
            alpha = alpha[None]
        classes = np.atleast_1d(np.asarray(classes))
        if alpha.ndim != 2 or alpha.shape[1] != self.num_filters:
            raise ValueError(f"alpha must have {self.num_filters} filter scores per input, got shape {alpha.shape}")
        if classes.shape != (len(alpha),) or classes.dtype.kind not in "iu":
            raise ValueError(f"classes must be {len(alpha)} integer class ids, got {classes.dtype} shape {classes.shape}")
        # One float32 sum per row is finite exactly when the row is (short of an overflow); a
        # batch's total may overflow though every row is fine, so each row is judged alone.
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what is looked for
            row_sums = row_sums_of(alpha)
        bad = np.flatnonzero(~np.isfinite(row_sums))
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"alpha[{row}] contains NaN or infinite values" if not np.isfinite(alpha[row]).all()
                             else f"alpha[{row}] values are too large: their sum overflows float32")
        classes = classes.astype(np.int64, copy=False)
        unknown = (classes < 0) | (classes >= self.num_classes)
        if unknown.any():
            raise ValueError(f"unknown class {int(classes[unknown][0])}: class ids must be in [0, {self.num_classes - 1}]")
        empty = ~self.scorable[classes]
        if empty.any():
            raise ValueError(f"class {int(classes[empty][0])} has no training images in the distribution store "
                             "and the store holds no pooled distribution for it; rebuild the store")
        return alpha, classes, row_sums

    def statistics(self, alpha: np.ndarray, classes: np.ndarray, row_sums: np.ndarray,
                   inverse: np.ndarray | None = None) -> FilterStatistics:
        """Statistics of checked input (the three arrays :meth:`check` returns); ``inverse``
        (C, K) overrides the store's :func:`inverse_scale`."""
        inverse = self.inverse_scale if inverse is None else inverse
        # ndarray methods rather than np.take & co.: the same work without a Python wrapper per call
        surprising, surprise = flagged(alpha, self.p_high.take(classes, axis=0), classes, inverse)
        expected_missing, missing = flagged(self.p_low_expected.take(classes, axis=0), alpha, classes, inverse)
        beta = beta_scores(alpha, self.mean_of_means[classes], row_sums)
        return FilterStatistics(
            surprising=surprising,
            expected_missing=expected_missing,
            surprise_count=surprising.count,
            expectation_count=expected_missing.count,
            surprise=surprise,
            missing=missing,
            beta=beta,
            beta_percentile=percentile_in_grid(beta, self.beta_grid[classes]),
            beta_z=(beta - self.beta_median[classes]) / self.beta_scale[classes],
        )
