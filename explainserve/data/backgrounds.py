"""Background photographs: the colour images shipped offline by ``skimage.data``.

The photographs are split in two disjoint sets. In-distribution scenes use
:data:`IN_DISTRIBUTION_PHOTOS`; the out-of-distribution split uses :data:`OOD_PHOTOS`, which
no training sample ever shows. (``skimage.data.cat`` is the same picture as ``chelsea`` and is
therefore not used at all.)
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from skimage import data as skdata

IN_DISTRIBUTION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
OOD_PHOTOS = ("hubble_deep_field", "retina", "colorwheel")


@functools.lru_cache(maxsize=None)
def photograph(name: str) -> Image.Image:
    """Return the named ``skimage.data`` colour photograph as an RGB PIL image."""
    if name not in IN_DISTRIBUTION_PHOTOS + OOD_PHOTOS:
        raise ValueError(f"name: unknown photograph {name!r}; accepted: {IN_DISTRIBUTION_PHOTOS + OOD_PHOTOS}")
    return Image.fromarray(getattr(skdata, name)()[..., :3])


def random_background(rng: np.random.Generator, photos: tuple[str, ...], size: int,
                      crop_fraction: tuple[float, float] = (0.25, 0.6),
                      brightness: tuple[float, float] = (0.4, 0.7)) -> np.ndarray:
    """Crop a random square from a random photograph, resize it and dim it.

    Parameters
    ----------
    rng
        Source of randomness (the only one used, so results are reproducible).
    photos
        Names of the photographs to choose from.
    size
        Side of the returned square, in pixels.
    crop_fraction
        Range of the crop side as a fraction of the photograph's shorter side.
    brightness
        Range of the factor the crop is multiplied by; dimming keeps the item visible.

    Returns
    -------
    numpy.ndarray
        float32 (size, size, 3) in [0, 255].
    """
    photo = photograph(photos[rng.integers(len(photos))])
    side = int(rng.uniform(*crop_fraction) * min(photo.size))
    left = int(rng.integers(photo.size[0] - side + 1))
    top = int(rng.integers(photo.size[1] - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) * np.float32(rng.uniform(*brightness))
