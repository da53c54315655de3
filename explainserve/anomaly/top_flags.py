"""The most extreme flagged filters of every row of a :class:`BatchScores`, as arrays.

:meth:`BatchScores.sample` builds one object per flagged filter (with its exemplars), which
costs far more than the scoring itself when every row of a large batch is built; bulk scoring
needs only each row's first few flags, and this computes them for the whole batch at once from
the sparse flags the scorer keeps (:meth:`~explainserve.anomaly.reference.Flags.top`).
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
    return TopFlags(*scores.surprising.top(k), *scores.expected_missing.top(k))
