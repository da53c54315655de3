"""Fashion-MNIST as installed by Debian's ``dataset-fashion-mnist`` package."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .idx import read_idx

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the Debian package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)"
    )


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(part: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Load one official part of Fashion-MNIST.

    Parameters
    ----------
    part
        ``"train"`` (60,000 items) or ``"test"`` (10,000 items), the official split.
    root
        Folder holding the IDX files (plain or ``.gz``).

    Returns
    -------
    images : numpy.ndarray
        uint8 (N, 28, 28), white item on a black background.
    labels : numpy.ndarray
        int64 (N,), indices into :data:`CLASS_NAMES`.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message names the Debian package to install.
    ValueError
        If a file is corrupt or images and labels disagree in count.
    """
    if part not in _FILES:
        raise ValueError(f"part: must be 'train' or 'test', got {part!r}")
    root = Path(root)
    image_path, label_path = (_find(root, stem) for stem in _FILES[part])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{label_path}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images in {image_path}")
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{label_path}: label {int(labels.max())} outside [0, {len(CLASS_NAMES) - 1}]")
    return images, labels.astype(np.int64)
