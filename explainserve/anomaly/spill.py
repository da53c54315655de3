"""Spill alpha vectors to one file per class, so a class can later be read back alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ClassSpill:
    """Append-only per-class float32 files in a scratch directory.

    Rows are buffered in memory and appended to ``<class>.alpha`` / ``<class>.ids`` once the
    buffer passes ``buffer_bytes``, so at most a buffer plus one class is ever in memory and no
    file handle stays open. Rows of a class are read back in the order they were added.

    Parameters
    ----------
    directory : Path
        Empty scratch directory.
    num_filters : int
        K, the alpha length.
    buffer_bytes : int
        Flush threshold.
    """

    def __init__(self, directory: Path, num_filters: int, buffer_bytes: int = 64 << 20):
        self.directory = Path(directory)
        self.num_filters = num_filters
        self.buffer_bytes = buffer_bytes
        self._pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_bytes = 0

    def add(self, alpha: np.ndarray, classes: np.ndarray, image_ids: np.ndarray) -> None:
        """Queue rows; ``alpha`` (B, K) float32, ``classes`` and ``image_ids`` (B,) int."""
        for class_id in np.unique(classes):
            rows = classes == class_id
            self._pending.setdefault(int(class_id), []).append(
                (np.ascontiguousarray(alpha[rows], dtype=np.float32), image_ids[rows].astype(np.int64))
            )
        self._pending_bytes += alpha.nbytes
        if self._pending_bytes >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for class_id, chunks in self._pending.items():
            with open(self.directory / f"{class_id}.alpha", "ab") as values, \
                    open(self.directory / f"{class_id}.ids", "ab") as ids:
                for alpha, image_ids in chunks:
                    values.write(alpha.tobytes())
                    ids.write(image_ids.tobytes())
        self._pending.clear()
        self._pending_bytes = 0

    def read(self, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All rows of a class: alpha (N, K) float32 and ids (N,) int64; N may be 0."""
        self.flush()
        values_file = self.directory / f"{class_id}.alpha"
        if not values_file.exists():
            return np.empty((0, self.num_filters), np.float32), np.empty(0, np.int64)
        values = np.fromfile(values_file, dtype=np.float32).reshape(-1, self.num_filters)
        return values, np.fromfile(self.directory / f"{class_id}.ids", dtype=np.int64)
