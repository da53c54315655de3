"""Paired bootstrap confidence intervals and the three-way verdict of an ordering claim.

Every ordering the report judges compares two methods on the same samples, so the interval is
of the paired difference: the samples are resampled with replacement, both methods' statistic
is recomputed on the same resample, and the 2.5 and 97.5 percentiles of the difference bound it.
A claim "a is better than b" then **holds** when the whole interval is on a's side, **does not
hold** when the whole interval is on b's side, and is **undecided** at this power otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided"


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` of one statistic and its bootstrap interval.

    Attributes
    ----------
    estimate : the statistic of a minus that of b on all ``n`` samples.
    low, high : percentile bootstrap interval at ``LEVEL``.
    n : samples both were measured on.
    """

    estimate: float
    low: float
    high: float
    n: int

    def verdict(self) -> str:
        """For the claim "a scores lower than b": holds, does not hold or undecided."""
        if self.high < 0:
            return HOLDS
        if self.low > 0:
            return FAILS
        return UNDECIDED

    def text(self, digits: int = 4) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_difference(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = RESAMPLES,
                         level: float = LEVEL, seed: int = SEED) -> Difference:
    """Percentile bootstrap of a paired statistic.

    Parameters
    ----------
    statistic : maps index arrays (R, n) of samples, one resample a row, to the differences
        a - b (R,) measured on them (both methods on the same indices, so the pairing is kept).
    n : number of samples, >= 2.
    resamples, level, seed : bootstrap resamples, interval coverage in (0, 1), generator seed.

    Returns
    -------
    Difference
    """
    if n < 2:
        raise ValueError(f"n: a bootstrap needs at least 2 samples, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    index = np.random.default_rng(seed).integers(0, n, (resamples, n))
    values = np.asarray(statistic(index), dtype=np.float64)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Difference(float(statistic(np.arange(n)[None])[0]), float(low), float(high), n)


def mean_difference(a: Sequence[float], b: Sequence[float], **options) -> Difference:
    """Bootstrap of mean(a) - mean(b) over paired per-sample values a, b of shape (n,)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a, b: paired values need one shape (n,), got {a.shape} and {b.shape}")
    difference = a - b
    return bootstrap_difference(lambda index: difference[index].mean(axis=1), len(difference), **options)


def combine(verdicts: Sequence[str]) -> str:
    """A chain of links: holds when every link holds, does not hold when any link does not hold."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return UNDECIDED
