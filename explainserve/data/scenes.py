"""FashionScenes: Fashion-MNIST items pasted on photographs, with pixel-exact masks."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .backgrounds import random_background
from .compose import bounding_box, paste, random_colour, render_item, to_uint8
from .fashion_mnist import CLASS_NAMES, load_fashion_mnist
from .synthetic import SyntheticDataset

# Held out of training: Shirt is a near-OOD class (it resembles T-shirt, Pullover and Coat),
# Bag a far-OOD one (no garment looks like it).
OOD_CLASSES = (6, 8)
IN_CLASSES = tuple(c for c in range(len(CLASS_NAMES)) if c not in OOD_CLASSES)


class SceneBatch(NamedTuple):
    """A stack of scenes: images uint8 (N,H,W,3), labels int64 (N,), masks bool (N,H,W),
    boxes int64 (N,4) half-open ``(y0, x0, y1, x1)``."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


class FashionScenes(SyntheticDataset):
    """Colourised Fashion-MNIST items on crops of real photographs (like BAM, thesis §3.5.4).

    Each sample is made as follows, from its own seeded random stream:

    1. Background: a random square crop (25–60 % of the shorter side) of one of the split's
       ``skimage.data`` photographs, resized to ``image_size`` and dimmed to 40–70 %.
    2. Item: a Fashion-MNIST item resized to 40–70 % of ``image_size`` (26–45 px at 64 px),
       coloured with a random saturated hue (texture kept as shading), pasted whole at a
       random position.
    3. Mask: exactly the pasted pixels; box: the half-open bounding box of the mask.

    Splits (8 in-distribution classes; Shirt and Bag are held out):

    ============== ======================== ============================= ========
    split          items                    photographs                   size
    ============== ======================== ============================= ========
    train          official train 0–54,999  in-distribution (5)           44,000
    val            official train 55,000–   in-distribution               4,000
    test           official test            in-distribution               8,000
    ood_classes    official test, Shirt+Bag in-distribution               2,000
    ood_backgrounds official test           held out (hubble, retina,     8,000
                                            colorwheel)
    ============== ======================== ============================= ========

    Sizes are those of the item pools; ``size`` draws fewer (a seeded subset) or more (items
    reused with fresh composites). Labels are indices into :attr:`class_names`, which lists
    the 8 in-distribution classes; the ``ood_classes`` split carries the label -1 for every
    sample and names the true class in ``fashion_class``.

    Parameters
    ----------
    split
        One of "train", "val", "test", "ood_classes", "ood_backgrounds".
    seed
        Seed of the composition (backgrounds, colours, scales, positions, item order).
        Same seed, same bytes.
    size
        Number of samples, or None for the item pool size.
    image_size
        Side of the square RGB images, in pixels (64–112 recommended; at least 32).
    """

    in_classes = IN_CLASSES
    ood_classes = OOD_CLASSES

    def __init__(self, split: str, seed: int = 0, size: int | None = None, image_size: int = 64):
        if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 512:
            raise ValueError(f"image_size: must be an integer in [32, 512], got {image_size!r}")
        self.image_size = int(image_size)
        super().__init__(split, seed, size)
        self._images, self._labels = load_fashion_mnist(self.source.part)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes the labels index (the 8 in-distribution classes)."""
        return [CLASS_NAMES[c] for c in IN_CLASSES]

    @property
    def ood_class_names(self) -> list[str]:
        """Names of the held-out Fashion-MNIST classes."""
        return [CLASS_NAMES[c] for c in OOD_CLASSES]

    def _generate(self, rng: np.random.Generator, item: int) -> dict[str, Any]:
        canvas = random_background(rng, self.source.photos, self.image_size)
        side = int(round(rng.uniform(0.4, 0.7) * self.image_size))
        centre = rng.uniform(side / 2, self.image_size - side / 2, size=2)
        mask = paste(canvas, render_item(self._images[item], side), tuple(centre), random_colour(rng))
        fashion_class = int(self._labels[item])
        label = IN_CLASSES.index(fashion_class) if fashion_class in IN_CLASSES else -1
        return {"image": to_uint8(canvas), "label": label, "mask": mask, "box": bounding_box(mask),
                "fashion_class": fashion_class, "item": item}

    def background(self, index: int) -> np.ndarray:
        """The background of sample ``index`` alone, uint8 (H, W, 3): the scene minus its item."""
        return to_uint8(random_background(self.rng(index % self.size), self.source.photos, self.image_size))

    def batch(self, indices=None) -> SceneBatch:
        """Stack samples ``indices`` (default: all) into a :class:`SceneBatch`."""
        images, labels, masks, boxes = self._stack(indices, ("image", "label", "mask", "box"))
        return SceneBatch(images, labels.astype(np.int64), masks, boxes)
