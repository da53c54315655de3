"""Which Fashion-MNIST items and which photographs each split draws from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backgrounds import IN_DISTRIBUTION_PHOTOS, OOD_PHOTOS
from .fashion_mnist import load_fashion_mnist

# The last 5,000 items of the official training part are the validation items.
VALIDATION_ITEMS = 5000


@dataclass(frozen=True)
class SplitSource:
    """The pool a split draws from.

    Attributes
    ----------
    code
        Small integer mixed into every random seed, so splits never share a random stream.
    part
        Official Fashion-MNIST part ("train" or "test").
    first, stop
        Range of item indices used within that part.
    classes
        Fashion-MNIST class indices allowed in the split.
    photos
        Background photographs allowed in the split.
    """

    code: int
    part: str
    first: int
    stop: int | None
    classes: tuple[int, ...]
    photos: tuple[str, ...]

    def item_indices(self) -> np.ndarray:
        """Indices (into the official part) of the items the split may use, ascending."""
        _, labels = load_fashion_mnist(self.part)
        indices = np.arange(labels.shape[0])[self.first:self.stop]
        return indices[np.isin(labels[indices], self.classes)]


def split_sources(in_classes: tuple[int, ...], ood_classes: tuple[int, ...]) -> dict[str, SplitSource]:
    """The five splits: train/val/test in distribution, and the two out-of-distribution splits.

    ``ood_classes`` shows held-out classes on in-distribution photographs; ``ood_backgrounds``
    shows in-distribution classes on held-out photographs. Each varies one factor only.
    """
    holdout = -VALIDATION_ITEMS
    return {
        "train": SplitSource(0, "train", 0, holdout, in_classes, IN_DISTRIBUTION_PHOTOS),
        "val": SplitSource(1, "train", holdout, None, in_classes, IN_DISTRIBUTION_PHOTOS),
        "test": SplitSource(2, "test", 0, None, in_classes, IN_DISTRIBUTION_PHOTOS),
        "ood_classes": SplitSource(3, "test", 0, None, ood_classes, IN_DISTRIBUTION_PHOTOS),
        "ood_backgrounds": SplitSource(4, "test", 0, None, in_classes, OOD_PHOTOS),
    }


def check_split(split: str, sources: dict[str, SplitSource]) -> SplitSource:
    """Return the source of ``split`` or raise a ValueError listing the accepted names."""
    if split not in sources:
        raise ValueError(f"split: must be one of {tuple(sources)}, got {split!r}")
    return sources[split]
