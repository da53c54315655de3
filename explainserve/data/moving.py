"""MovingFashion: 16-frame clips of a Fashion-MNIST item moving over a photograph."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .backgrounds import IN_DISTRIBUTION_PHOTOS, random_background
from .compose import bounding_box, paste, random_colour, render_item, to_uint8
from .fashion_mnist import CLASS_NAMES, load_fashion_mnist
from .splits import SplitSource
from .synthetic import SyntheticDataset

FRAMES = 16
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "rotate-cw", "rotate-ccw")
# Motions no training clip shows (the "ood_motions" split): a diagonal slide (near: two trained
# slides at once) and an item that does not move at all (far: no motion to classify).
OOD_MOTIONS = ("diagonal", "still")
# Unit (row, column) step of each translation, in image coordinates (rows grow downwards).
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
#: Seed code of the "ood_motions" split (after the five of explainserve.data.splits).
OOD_MOTIONS_CODE = 5


class ClipBatch(NamedTuple):
    """A stack of clips: clips uint8 (N,T,H,W,3), labels int64 (N,), masks bool (N,T,H,W),
    boxes int64 (N,T,4) half-open ``(y0, x0, y1, x1)`` per frame."""

    clips: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


class MovingFashion(SyntheticDataset):
    """Clips whose class is the motion of the item, not what the item is.

    Each clip: a static background (a crop of a ``skimage.data`` photograph, dimmed as in
    :class:`~explainserve.data.FashionScenes`) and one colourised Fashion-MNIST item (any of
    the 10 classes) that, over ``FRAMES`` = 16 frames, does one of :data:`MOTIONS`:

    - left / right / up / down: slides 25–40 % of the frame side, item side 35–50 %;
    - grow / shrink: its side changes by a factor 1.5–1.9 (from 30–38 % of the frame side);
    - rotate-cw / rotate-ccw: turns 90–180 degrees about its centre (clockwise as displayed
      for rotate-cw), starting within ±30 degrees of upright.

    The motion is uniform in time and the item stays wholly inside the frame. Every frame
    carries the pixel-exact mask of the item, so the ground-truth tube is known.

    Splits (item pools as in FashionScenes, motions balanced by a seeded draw):
    "train" (official train items 0–54,999; 55,000 clips by default, use ``size``),
    "val" (5,000), "test" (10,000), "ood_backgrounds" (test items on held-out photographs),
    "ood_motions" (test items on in-distribution photographs doing one of :data:`OOD_MOTIONS`,
    drawn half and half; label -1, the motion named in the sample's ``motion``):

    - diagonal: slides along one of the four diagonals, 25–40 % of the frame side along each
      axis, item side 35–50 % (a left or right slide and an up or down slide at once);
    - still: the item, side 35–50 %, upright, stays where it is for all 16 frames.

    Parameters
    ----------
    split
        One of "train", "val", "test", "ood_backgrounds", "ood_motions".
    seed
        Seed of the composition; same seed, same bytes.
    size
        Number of clips, or None for the item pool size.
    image_size
        Side of the square frames in pixels (at least 32; 64 by default).
    """

    in_classes = tuple(range(len(CLASS_NAMES)))
    ood_classes = ()

    def __init__(self, split: str, seed: int = 0, size: int | None = None, image_size: int = 64):
        if split == "ood_classes":
            raise ValueError("split: MovingFashion's classes are motions; it has no 'ood_classes' split "
                             "(accepted: 'train', 'val', 'test', 'ood_backgrounds', 'ood_motions')")
        if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 512:
            raise ValueError(f"image_size: must be an integer in [32, 512], got {image_size!r}")
        self.image_size = int(image_size)
        super().__init__(split, seed, size)
        self._images, _ = load_fashion_mnist(self.source.part)

    @classmethod
    def split_sources(cls) -> dict[str, SplitSource]:
        """FashionScenes' splits without "ood_classes", plus "ood_motions"."""
        sources = super().split_sources()
        del sources["ood_classes"]
        sources["ood_motions"] = SplitSource(OOD_MOTIONS_CODE, "test", 0, None, cls.in_classes, IN_DISTRIBUTION_PHOTOS)
        return sources

    @property
    def class_names(self) -> list[str]:
        """The motions, in label order."""
        return list(MOTIONS)

    def _slide(self, rng: np.random.Generator, step: tuple[int, int]):
        """Per-frame (centre (T,2), side (T,), angle (T,)) of a slide by ``travel`` along each
        axis where ``step`` (row, column) is non-zero."""
        size, t = self.image_size, np.linspace(0.0, 1.0, FRAMES)
        side = np.full(FRAMES, rng.uniform(0.35, 0.5) * size)
        travel = rng.uniform(0.25, 0.4) * size
        step = np.asarray(step, dtype=float)
        # Start where the whole path stays inside the frame.
        low = side[0] / 2 + np.where(step < 0, travel, 0.0)
        high = size - side[0] / 2 - np.where(step > 0, travel, 0.0)
        centre = rng.uniform(low, high) + t[:, None] * travel * step
        return centre, side, np.zeros(FRAMES)

    def _trajectory(self, rng: np.random.Generator, motion: str):
        """Per-frame (centre (T,2), side (T,), angle (T,)) of one motion."""
        size, t = self.image_size, np.linspace(0.0, 1.0, FRAMES)
        if motion in _DIRECTIONS:
            return self._slide(rng, _DIRECTIONS[motion])
        if motion == "diagonal":
            return self._slide(rng, _DIAGONALS[rng.integers(len(_DIAGONALS))])
        if motion == "still":
            return self._slide(rng, (0, 0))
        if motion in ("grow", "shrink"):
            small = rng.uniform(0.3, 0.38) * size
            large = small * rng.uniform(1.5, 1.9)
            side = small + (large - small) * (t if motion == "grow" else 1.0 - t)
            centre = rng.uniform(large / 2, size - large / 2, size=2)
            return np.broadcast_to(centre, (FRAMES, 2)), side, np.zeros(FRAMES)
        side = np.full(FRAMES, rng.uniform(0.35, 0.45) * size)
        reach = side[0] * np.sqrt(2) / 2  # half-diagonal: the rotated item's largest extent
        centre = rng.uniform(reach, size - reach, size=2)
        sign = -1.0 if motion == "rotate-cw" else 1.0  # PIL rotates counter-clockwise for positive angles
        angle = rng.uniform(-30, 30) + sign * rng.uniform(90, 180) * t
        return np.broadcast_to(centre, (FRAMES, 2)), side, angle

    def _generate(self, rng: np.random.Generator, item: int) -> dict[str, Any]:
        if self.split == "ood_motions":
            label, motion = -1, OOD_MOTIONS[rng.integers(len(OOD_MOTIONS))]
        else:
            label = int(rng.integers(len(MOTIONS)))
            motion = MOTIONS[label]
        background = random_background(rng, self.source.photos, self.image_size)
        colour = random_colour(rng)
        centres, sides, angles = self._trajectory(rng, motion)
        frames, masks = [], []
        for centre, side, angle in zip(centres, sides, angles):
            canvas = background.copy()
            masks.append(paste(canvas, render_item(self._images[item], int(round(side)), float(angle)),
                               tuple(centre), colour))
            frames.append(to_uint8(canvas))
        masks = np.stack(masks)
        return {"clip": np.stack(frames), "label": label, "mask": masks,
                "box": np.stack([bounding_box(m) for m in masks]), "item": item, "motion": motion}

    def batch(self, indices=None) -> ClipBatch:
        """Stack clips ``indices`` (default: all) into a :class:`ClipBatch`."""
        clips, labels, masks, boxes = self._stack(indices, ("clip", "label", "mask", "box"))
        return ClipBatch(clips, labels.astype(np.int64), masks, boxes)
