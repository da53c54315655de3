"""Demo data with known ground truth: FashionScenes images and MovingFashion clips.

Both are generated deterministically from Fashion-MNIST (Debian's ``dataset-fashion-mnist``)
and the colour photographs of ``skimage.data``; every sample carries a pixel-exact object mask.
"""

from .fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES, load_fashion_mnist
from .idx import read_idx
from .moving import MOTIONS, OOD_MOTIONS, ClipBatch, MovingFashion
from .scenes import IN_CLASSES, OOD_CLASSES, FashionScenes, SceneBatch

__all__ = [
    "FASHION_MNIST_CLASSES", "IN_CLASSES", "MOTIONS", "OOD_CLASSES", "OOD_MOTIONS",
    "ClipBatch", "FashionScenes", "MovingFashion", "SceneBatch",
    "load_fashion_mnist", "read_idx",
]
