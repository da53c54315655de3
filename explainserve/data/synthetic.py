"""Shared machinery of the generated data sets: lazy, index-addressed, seeded samples."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .splits import SplitSource, check_split, split_sources


class SyntheticDataset:
    """Base of :class:`FashionScenes` and :class:`MovingFashion`.

    Sample ``i`` is generated on demand from a random stream seeded by ``(seed, split, i)``,
    so a sample's bytes depend only on those three numbers (never on the access order), and
    two splits never share a stream. Subclasses implement :meth:`_generate`.
    """

    in_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]

    def __init__(self, split: str, seed: int = 0, size: int | None = None):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        self.split = split
        self.seed = int(seed)
        self.source: SplitSource = check_split(split, self.split_sources())
        self._items = self.source.item_indices()
        if size is None:
            size = len(self._items)
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size: must be a positive integer or None, got {size!r}")
        self.size = int(size)
        # Which item sample i shows: a seeded permutation, cycled when size exceeds the pool.
        self._order = np.random.default_rng([self.seed, self.source.code]).permutation(len(self._items))

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index: {index} outside [0, {self.size}) for split {self.split!r}")
        index %= self.size
        return self._generate(self.rng(index), self.item_index(index))

    @classmethod
    def split_sources(cls) -> dict[str, SplitSource]:
        """The splits this data set accepts, by name (a subclass may add or drop some)."""
        return split_sources(cls.in_classes, cls.ood_classes)

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of sample ``index``."""
        return np.random.default_rng([self.seed, self.source.code, index])

    def item_index(self, index: int) -> int:
        """Index, within the official Fashion-MNIST part, of the item sample ``index`` shows."""
        return int(self._items[self._order[index % len(self._items)]])

    def item_indices(self) -> np.ndarray:
        """Official-part indices of all items the split may show (int64, ascending)."""
        return self._items.copy()

    def _generate(self, rng: np.random.Generator, item: int) -> dict[str, Any]:
        raise NotImplementedError

    def _stack(self, indices, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        indices = range(self.size) if indices is None else indices
        samples = [self[int(i)] for i in indices]
        return tuple(np.stack([s[k] for s in samples]) for k in keys)
