"""Conformal p-values of the verdict's tests, from two disjoint parts of the held-out images.

Part A puts the three tests on one scale. For each test and class (or the class-independent
pool) it keeps the test statistic's quantiles at upper-tail probabilities ``TAIL_LEVELS`` and an
exponential tail past the last one (peaks over threshold: the share of part-A values above it
and their mean excess); :func:`tail_evidence` turns a statistic into -ln(tail probability) by
interpolating the grid, then following the exponential tail. A statistic with an atom (surprise
and missing are 0 for most inputs) starts its tail at the share of part-A values above the atom,
so one small exceedance is not taken for an extreme one. The verdict's combined statistic is
the largest evidence of the three tests (a min-p statistic).

Part B ranks. A statistic's p-value is its rank among the part-B images scored against the
same class (or the pool), interpolated linearly between neighbouring part-B values::

    p(v) = (n - r(v)) / (n + 1),   r(v) = j - 1 + (v - b[j-1]) / (b[j] - b[j-1])

with b the n part-B values sorted ascending and j = #{b < v}; p = 1 for v <= b[0] and
1 / (n + 1) for v > b[n-1]. At every b[j] this is the split-conformal p-value minus 1 / (n + 1),
and it is never below it by more, so P(p < α) lies within 1 / (n + 1) of α for an input
exchangeable with part B, and equals α where the statistic's density is locally flat between
neighbouring calibration values. It is deterministic (one input, one verdict) and falls as the
statistic grows, unlike a randomised conformal p-value.

The verdict's p-value is this p-value of the *combined* statistic: the min-p combination, its
null distribution taken from part B instead of from Šidák's independence formula (conservative
when the tests are positively dependent, as β and the missing test are) or the Cauchy
combination (valid only in the limit of small p). Since part A is fixed when part B is ranked,
the combined statistic is one fixed function of the input and the p-value is valid whatever the
dependence between the three tests.
"""

from __future__ import annotations

import numpy as np

from explainserve.anomaly.feature_tests import FEATURE_TESTS

#: The verdict's tests, in the order of every (…, 3) array.
TESTS = ("surprise", "missing", "low_beta")
#: The three tests and their min-p combination, in the order of every (…, 4) array.
STATISTICS = TESTS + ("combined",)
#: The verdict's tests with the two pooled-feature tests, in the order of every (…, 5) array.
FIVE_TESTS = TESTS + FEATURE_TESTS
#: The statistics the feature block ranks: the feature tests and the five tests' min-p combination.
FEATURE_STATISTICS = FEATURE_TESTS + ("combined5",)
#: Upper-tail probabilities of the part-A grid (the last must leave a few images beyond it).
TAIL_LEVELS = np.array([0.5, 0.25, 0.1, 0.05, 0.025, 0.01])
EVIDENCE_LEVELS = -np.log(TAIL_LEVELS)
EVIDENCE_STEPS = np.diff(EVIDENCE_LEVELS)
#: Smallest slope of the exponential tail, in statistic units per unit of evidence. The three
#: statistics are in robust units (IQRs), so a tenth of one: where part A has nothing past an
#: atom, each further tenth of an IQR counts as one more e-fold of rarity, not a million.
MIN_SLOPE = 0.1


def fit_tail_grid(values: np.ndarray) -> np.ndarray:
    """Part-A tail model of each statistic: quantiles, then the exponential tail past the last.

    Parameters
    ----------
    values : np.ndarray
        (n, T) statistics of n >= 1 part-A images, larger = more anomalous.

    Returns
    -------
    np.ndarray
        (T, G + 2) float64: the quantiles at 1 - ``TAIL_LEVELS`` (non-decreasing), the evidence
        where the tail starts, -ln((m + 1) / (n + 1)) for the m values above the last quantile
        (at least the last level's), and the tail's slope, the mean excess of those m values
        over the last quantile (the exponential's scale; the grid's last decade when m = 0).
    """
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    quantiles = np.quantile(values, 1 - TAIL_LEVELS, axis=0).T
    last = quantiles[:, -1]
    above = values > last
    exceedances = above.sum(axis=0)
    start = np.maximum(-np.log((exceedances + 1) / (count + 1)), EVIDENCE_LEVELS[-1])
    excess = np.where(above, values - last, 0.0).sum(axis=0)
    decade = (last - quantiles[:, list(TAIL_LEVELS).index(0.1)]) / np.log(10)
    slope = np.maximum(np.divide(excess, exceedances, out=decade.copy(), where=exceedances > 0), MIN_SLOPE)
    return np.concatenate([quantiles, start[:, None], slope[:, None]], axis=1)


def tail_evidence(values: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """-ln(upper-tail probability) of each statistic under its part-A tail model.

    Parameters
    ----------
    values : np.ndarray
        (B, T) statistics.
    grids : np.ndarray
        (B, T, G + 2) the tail model of each row's group (:func:`fit_tail_grid`).

    Returns
    -------
    np.ndarray
        (B, T) float64 evidence, >= ln 2, non-decreasing in the statistic; past the last
        quantile it grows linearly from the tail's start (an exponential tail).
    """
    values = np.asarray(values, dtype=np.float64)
    quantiles = grids[..., :-2]
    # Piecewise-linear interpolation as a sum of ramps, one per grid interval: 0 below it, 1
    # above, linear inside. An interval of zero width (an atom) is a step taken only above the
    # atom, so v at an atom keeps the lowest level whose quantile reaches it, its true tail
    # probability P(T >= v).
    lower = quantiles[..., :-1]
    excess = values[..., None] - lower
    width = quantiles[..., 1:] - lower
    ramps = np.divide(excess, width, out=(excess > 0).astype(np.float64), where=width > 0)
    inside = EVIDENCE_LEVELS[0] + np.minimum(np.maximum(ramps, 0.0, out=ramps), 1.0, out=ramps) @ EVIDENCE_STEPS
    last, start, slope = quantiles[..., -1], grids[..., -2], grids[..., -1]
    return np.where(values > last, start + (values - last) / slope, inside)


def sorted_ranks(values: np.ndarray, width: int) -> np.ndarray:
    """Part-B statistics of one group sorted ascending per statistic, padded with +inf.

    Parameters
    ----------
    values : np.ndarray
        (n, S) float32 statistics of the group's n <= ``width`` part-B images.
    width : int

    Returns
    -------
    np.ndarray
        (S, width) float32.
    """
    ranks = np.full((values.shape[1], width), np.inf, dtype=np.float32)
    ranks[:, :len(values)] = np.sort(np.asarray(values, dtype=np.float32), axis=0).T
    return ranks


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys of float32 values that sort as the values do (-0.0 as 0.0; NaN above +inf)."""
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)
    return np.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


class RankTable:
    """Rows of sorted values, of different lengths, searchable all at once.

    Parameters
    ----------
    ranks : np.ndarray
        (R, L) float32 rows sorted ascending; only the first ``counts[r]`` of row r are held
        (the rest, +inf padding, is dropped).
    counts : np.ndarray
        (R,) int values held per row.

    Notes
    -----
    The held values are kept back to back, row after row (``values``, row r from
    ``starts[r]``). Each becomes the key (row << 32) | :func:`order_keys`, so the table is one
    sorted uint64 array and a single ``np.searchsorted`` answers queries on any rows.
    """

    def __init__(self, ranks: np.ndarray, counts: np.ndarray):
        ranks = np.asarray(ranks, dtype=np.float32)
        counts = np.asarray(counts, dtype=np.int64)
        self._hold(ranks[np.arange(ranks.shape[1]) < counts[:, None]], counts)

    def _hold(self, values: np.ndarray, counts: np.ndarray) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.counts = counts
        self.starts = np.cumsum(counts) - counts
        rows = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
        self.keys = (rows << np.uint64(32)) | order_keys(self.values)

    @classmethod
    def stacked(cls, *tables: "RankTable") -> "RankTable":
        """One table holding the rows of ``tables``, each table's rows after the previous one's."""
        table = cls.__new__(cls)
        table._hold(np.concatenate([t.values for t in tables]), np.concatenate([t.counts for t in tables]))
        return table

    def count_below(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(M,) int64, how many values of row ``rows[i]`` are < ``values[i]`` (float32)."""
        queries = (rows.astype(np.uint64) << np.uint64(32)) | order_keys(values)
        return self.keys.searchsorted(queries, side="left").astype(np.int64) - self.starts[rows]


def interpolated_p_values(table: RankTable, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Conformal p-values, linearly interpolated between part-B values (module docstring).

    Parameters
    ----------
    table : RankTable
    rows : np.ndarray
        (M,) int64 row of each query; every row used must hold at least one value.
    values : np.ndarray
        (M,) float32 statistics.

    Returns
    -------
    np.ndarray
        (M,) float64 in [1 / (n + 1), 1].
    """
    values = np.asarray(values, dtype=np.float32)
    counts, start = table.counts[rows], table.starts[rows]
    below = table.count_below(rows, values)
    upper = table.values[start + np.minimum(below, counts - 1)].astype(np.float64)
    lower = table.values[start + np.maximum(below - 1, 0)].astype(np.float64)
    width = upper - lower
    # Where 0 < below < n, lower < value <= upper, so the fraction lies in (0, 1].
    fraction = np.divide(values - lower, width, out=np.ones_like(width), where=width > 0)
    n = counts.astype(np.float64)
    rank = np.where(below >= counts, n - 1, below - 1 + fraction)
    return np.where(below == 0, 1.0, (n - rank) / (n + 1))


def critical_value(sorted_values: np.ndarray, target_fpr: float) -> float:
    """The statistic above which the interpolated p-value is below ``target_fpr``.

    Parameters
    ----------
    sorted_values : np.ndarray
        (n,) part-B values of one group and statistic, ascending, n >= 1.
    target_fpr : float

    Returns
    -------
    float
        +inf when no value can reach it (``target_fpr`` <= 1 / (n + 1)).
    """
    n = len(sorted_values)
    position = n - target_fpr * (n + 1)  # the rank r where p = target_fpr
    if position >= n - 1:
        return float("inf")
    if position <= 0:
        return float(sorted_values[0])
    below = int(np.floor(position))
    fraction = position - below
    return float(sorted_values[below] + fraction * (float(sorted_values[below + 1]) - float(sorted_values[below])))
