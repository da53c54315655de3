"""A deterministic, per-class stratified subset of a user's samples (``--limit``, ``--val-limit``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from explainserve.data.files import SampleFile
from explainserve.data.holdout import path_key

STRATIFIED_RULE = ("per class, a share of the limit proportional to the class's samples (largest remainders, "
                   "ties to the lower class index; at least one per class when the limit allows), taking the "
                   "samples whose sha256 of the path relative to the data root sorts first")


def allocate(counts: np.ndarray, limit: int) -> np.ndarray:
    """Samples kept per class: ``limit`` shared in proportion to ``counts``.

    Parameters
    ----------
    counts : np.ndarray
        (C,) int samples available per class.
    limit : int
        Samples to keep in all, >= 1.

    Returns
    -------
    np.ndarray
        (C,) int64, each at most its count, summing to min(limit, counts.sum()). When the limit
        is at least the number of non-empty classes, each of them keeps one sample or more.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if limit >= total:
        return counts.copy()
    present = counts > 0
    base = present.astype(np.int64) if limit >= present.sum() else np.zeros_like(counts)
    share = (limit - base.sum()) * (counts - base) / max(1, int((counts - base).sum()))
    kept = base + np.floor(share).astype(np.int64)
    remainder = share - np.floor(share)
    for class_id in np.lexsort((np.arange(len(counts)), -remainder))[:limit - int(kept.sum())]:
        kept[class_id] += 1
    return kept


def stratified_subset(samples: list[SampleFile], limit: int, root: Path) -> list[SampleFile]:
    """At most ``limit`` of ``samples``, shared among classes by :func:`allocate`.

    Within a class the samples kept are those whose :func:`~explainserve.data.holdout.path_key`
    sorts first, so the choice is the same on every machine and shard and does not depend on
    the listing order. The result keeps the order of ``samples``.

    Raises
    ------
    ValueError
        If ``limit`` < 1.
    """
    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    by_class: dict[int, list[SampleFile]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    labels = sorted(by_class)
    kept_counts = allocate(np.array([len(by_class[label]) for label in labels]), limit)
    kept: set[Path] = set()
    for label, count in zip(labels, kept_counts):
        kept.update(s.path for s in sorted(by_class[label], key=lambda s: path_key(s.path, root))[:count])
    return [sample for sample in samples if sample.path in kept]
