"""Synthetic pooled features for stores calibrated with the feature tests (unit and integration)."""

from __future__ import annotations

import numpy as np


def pooled_features(classes: np.ndarray, seed: int, filters: int, far_every: int = 0) -> np.ndarray:
    """(n, filters) float32 pooled features of ``classes`` (n,): a class mean (the same for every
    seed) plus correlated noise drawn with ``seed``; with ``far_every`` > 0, every such row from
    the first is moved far from them (so that the feature tests fire on it)."""
    means = np.random.default_rng(100).normal(size=(int(classes.max()) + 1, filters))
    mixing = np.random.default_rng(101).normal(size=(filters, filters)) / np.sqrt(filters)
    rng = np.random.default_rng(seed)
    features = means[classes] + 0.3 * rng.normal(size=(len(classes), filters)) @ mixing
    if far_every:
        features[::far_every] += 3.0 * rng.normal(size=(len(features[::far_every]), filters))
    return features.astype(np.float32)
