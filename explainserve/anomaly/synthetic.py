"""Synthetic Grad-AMap scores with a known per-class distribution, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from explainserve.anomaly.store import StoreMeta


@dataclass(frozen=True)
class SyntheticClasses:
    """alpha_n of class c ~ loc[c, n] + scale[c, n] * standard normal, filters independent.

    Attributes
    ----------
    loc, scale : np.ndarray
        (C, K) float32.
    """

    loc: np.ndarray
    scale: np.ndarray

    @classmethod
    def random(cls, num_classes: int, num_filters: int, seed: int = 0) -> "SyntheticClasses":
        rng = np.random.default_rng(seed)
        loc = rng.gamma(2.0, 0.01, size=(num_classes, num_filters)).astype(np.float32)
        scale = (0.2 * loc + 0.002).astype(np.float32)
        return cls(loc, scale)

    @property
    def meta(self) -> StoreMeta:
        num_classes, num_filters = self.loc.shape
        return StoreMeta(
            model_name="synthetic", model_version="1", layer="layer4",
            input_transform={"size": [224, 224], "mean": [0.5] * 3, "std": [0.25] * 3},
            class_names=tuple(f"class{c}" for c in range(num_classes)), num_filters=num_filters,
        )

    def sample(self, classes: np.ndarray, seed: int) -> np.ndarray:
        """(B, K) float32 alpha vectors drawn for ``classes`` (B,)."""
        noise = np.random.default_rng(seed).standard_normal((len(classes), self.loc.shape[1]), dtype=np.float32)
        return self.loc[classes] + self.scale[classes] * noise

    def features(self, classes: np.ndarray, seed: int) -> np.ndarray:
        """(B, K) float32 pooled features drawn for ``classes`` (B,), Gaussian with a low-rank
        covariance plus a little isotropic noise, so both feature tests have something to fit.

        z = 10 loc_c + M g + 0.01 eps, with g ~ N(0, I_r), eps ~ N(0, I_K), r = max(1, K // 4)
        and M (K, r) fixed by K (entries N(0, 0.05² / r)).
        """
        num_filters = self.loc.shape[1]
        rank = max(1, num_filters // 4)
        mixing = np.random.default_rng(num_filters).standard_normal((num_filters, rank)) * (0.05 / np.sqrt(rank))
        rng = np.random.default_rng(seed)
        latent = rng.standard_normal((len(classes), rank))
        noise = rng.standard_normal((len(classes), num_filters))
        return (10 * self.loc[classes] + latent @ mixing.T + 0.01 * noise).astype(np.float32)

    def batches(self, images_per_class: int, batch_size: int = 256, seed: int = 1) -> Iterator[tuple]:
        """A training stream in dataset order: classes interleaved, ids 0, 1, 2, ...

        Yields
        ------
        (alpha (B, K) float32, classes (B,) int64, image_ids (B,) int64)
        """
        num_classes = self.loc.shape[0]
        labels = np.tile(np.arange(num_classes), images_per_class)
        for start in range(0, len(labels), batch_size):
            classes = labels[start:start + batch_size]
            ids = np.arange(start, start + len(classes))
            yield self.sample(classes, seed + start), classes, ids
