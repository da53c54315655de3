"""Per-input statistics against a class's training distribution: flags, graded exceedances and β.

Both calibration and serving compute these with the same code, so the p-values are
calibrated on exactly the numbers they are later applied to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from explainserve.anomaly.store import DistributionStore
from explainserve.anomaly.summary import BETA_LEVELS, PERCENTILE_LEVELS, beta_scores, class_mean_of_means

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
class FilterStatistics:
    """Statistics of B alpha vectors, each against its own class.

    Attributes
    ----------
    surprising : np.ndarray
        (B, K) bool, alpha_n > P99.9_cn.
    expected_missing : np.ndarray
        (B, K) bool, alpha_n < P0.1_cn and mu_cn > mean_n(mu_cn).
    surprise_count, expectation_count : np.ndarray
        (B,) int64 row sums of the two masks.
    surprise : np.ndarray
        (B,) float32, sum over surprising filters of (alpha_n - P99.9_cn) / s_cn, with s_cn the
        robust scale of (class, filter) fitted on held-out images (0 without a scale).
    missing : np.ndarray
        (B,) float32, sum over expected-but-missing filters of (P0.1_cn - alpha_n) / s_cn.
    beta : np.ndarray
        (B,) float64, mean_n(alpha_n - mu_cn).
    beta_percentile : np.ndarray
        (B,) float64 in [0, 100], β's percentile within the class's training β.
    beta_z : np.ndarray
        (B,) float64, (β - median) / IQR of the class's training β; comparable across classes.
    """

    surprising: np.ndarray
    expected_missing: np.ndarray
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
    above = np.clip((grids <= values[:, None]).sum(axis=1), 1, grids.shape[1] - 1)
    low = np.take_along_axis(grids, (above - 1)[:, None], axis=1)[:, 0]
    high = np.take_along_axis(grids, above[:, None], axis=1)[:, 0]
    width = high - low
    fraction = np.divide(values - low, width, out=(values >= high).astype(np.float64), where=width > 0)
    percent = levels[above - 1] + fraction * (levels[above] - levels[above - 1])
    return np.clip(percent, levels[0], levels[-1])


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

    def check(self, alpha, classes) -> tuple[np.ndarray, np.ndarray]:
        """Validate scoring input.

        Parameters
        ----------
        alpha : array-like
            (B, K) or (K,) filter scores.
        classes : array-like
            (B,) or scalar class ids.

        Returns
        -------
        (np.ndarray, np.ndarray)
            alpha (B, K) float32 and classes (B,) int64.

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
        if classes.shape != (len(alpha),) or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"classes must be {len(alpha)} integer class ids, got {classes.dtype} shape {classes.shape}")
        # One float32 sum per row is finite exactly when the row is (short of an overflow); a
        # batch's total may overflow though every row is fine, so each row is judged alone.
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what is looked for
            bad = np.flatnonzero(~np.isfinite(alpha.sum(axis=1, dtype=np.float32)))
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
        return alpha, classes

    @staticmethod
    def _exceedances(upper: np.ndarray, lower: np.ndarray, flagged: np.ndarray, classes: np.ndarray,
                     inverse: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Per row: how many entries are flagged (B,) int64, and the sum of (upper - lower) / s_cn
        over them (B,) float32, in entry order (the same sum whatever the batch; zero without
        scales). Only the flagged entries are touched: a few per in-distribution input."""
        entries = np.flatnonzero(flagged)  # several times faster than a 2-D np.nonzero
        rows, columns = np.divmod(entries, flagged.shape[1])
        count = np.bincount(rows, minlength=len(flagged)).astype(np.int64)
        if inverse is None:
            return count, np.zeros(len(flagged), dtype=np.float32)
        terms = (upper.ravel()[entries] - lower.ravel()[entries]) * inverse[classes[rows], columns]
        return count, np.bincount(rows, weights=terms, minlength=len(flagged)).astype(np.float32)

    def statistics(self, alpha: np.ndarray, classes: np.ndarray, inverse: np.ndarray | None = None) -> FilterStatistics:
        """Statistics of checked input (see :meth:`check`); ``inverse`` (C, K) overrides the
        store's :func:`inverse_scale`."""
        inverse = self.inverse_scale if inverse is None else inverse
        high = np.take(self.p_high, classes, axis=0)
        low = np.take(self.p_low_expected, classes, axis=0)
        surprising, expected_missing = alpha > high, alpha < low
        surprise_count, surprise = self._exceedances(alpha, high, surprising, classes, inverse)
        expectation_count, missing = self._exceedances(low, alpha, expected_missing, classes, inverse)
        beta = beta_scores(alpha, self.mean_of_means[classes])
        return FilterStatistics(
            surprising=surprising,
            expected_missing=expected_missing,
            surprise_count=surprise_count,
            expectation_count=expectation_count,
            surprise=surprise,
            missing=missing,
            beta=beta,
            beta_percentile=percentile_in_grid(beta, self.beta_grid[classes]),
            beta_z=(beta - self.beta_median[classes]) / self.beta_scale[classes],
        )
