"""The most extreme flagged filters of every row of a :class:`BatchScores`, as arrays.

:meth:`BatchScores.sample` builds one object per flagged filter (with its exemplars), which
costs far more than the scoring itself when every row of a large batch is built; bulk scoring
needs only each row's first few flags, and this computes them for the whole batch at once,
touching only the flagged entries (a few per in-distribution input).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from explainserve.anomaly.scorer import BatchScores


class TopFlags(NamedTuple):
    """The k most extreme flags of each of B rows, in :meth:`BatchScores.sample`'s order.

    Attributes
    ----------
    surprising_filters, missing_filters : np.ndarray
        (B, k) int32 filter indices, most extreme first; -1 pads a row with fewer than k flags.
    surprising_exceedance, missing_exceedance : np.ndarray
        (B, k) float32 exceedances |alpha - threshold| / s_cn of those filters, in robust units
        of the (class, filter); 0 in the padding.
    """

    surprising_filters: np.ndarray
    surprising_exceedance: np.ndarray
    missing_filters: np.ndarray
    missing_exceedance: np.ndarray


def top_flags(scores: BatchScores, k: int) -> TopFlags:
    """The ``k`` most extreme surprising and expected-but-missing filters of every row.

    Row i equals the first ``k`` entries of ``scores.sample(i).surprising`` and
    ``.expected_missing`` (filters and exceedances, ties broken by filter index).

    Parameters
    ----------
    scores : BatchScores
    k : int
        Flags per row and kind, >= 0.

    Returns
    -------
    TopFlags
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    reference = scores.scorer.reference
    surprising = _top(scores.surprising, scores, reference.p_high, 1.0, k)
    missing = _top(scores.expected_missing, scores, reference.p_low, -1.0, k)
    return TopFlags(*surprising, *missing)


def _top(mask: np.ndarray, scores: BatchScores, thresholds: np.ndarray, sign: float,
         k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, k) filters and exceedances of the flagged entries of ``mask`` (B, K), largest first."""
    filters = np.full((len(mask), k), -1, dtype=np.int32)
    exceedance = np.zeros((len(mask), k), dtype=np.float32)
    entries = np.flatnonzero(mask) if k else np.empty(0, dtype=np.intp)
    if not len(entries):
        return filters, exceedance
    rows, columns = np.divmod(entries, mask.shape[1])
    classes = scores.classes[rows]
    inverse = scores.scorer.reference.inverse_scale
    # The same float32 arithmetic as BatchScores.sample, so the values are equal, not just close.
    values = sign * (scores.alpha[rows, columns] - thresholds[classes, columns]) * inverse[classes, columns]
    # By row, then largest first, then filter index (the entries come in filter order): two
    # stable sorts take half the time of np.lexsort here.
    order = np.argsort(-values.astype(np.float64), kind="stable")
    order = order[np.argsort(rows[order], kind="stable")]
    rows, columns, values = rows[order], columns[order], values[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    kept = rank < k
    filters[rows[kept], rank[kept]] = columns[kept]
    exceedance[rows[kept], rank[kept]] = values[kept]
    return filters, exceedance
