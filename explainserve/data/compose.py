"""Colourising a Fashion-MNIST item and pasting it, with a pixel-exact mask, onto a background."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

# Item pixels whose resized intensity is below this (out of 255) are not pasted: the mask is
# exactly the set of pixels that came from the item.
MASK_THRESHOLD = 40


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB colour, float32 (3,) in [0, 1]."""
    hue, saturation, value = rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0)
    return np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


def render_item(item: np.ndarray, side: int, angle: float = 0.0) -> np.ndarray:
    """Resize a 28x28 item to ``side`` pixels and rotate it.

    Parameters
    ----------
    item
        uint8 (28, 28) grayscale item.
    side
        Side of the resized item in pixels.
    angle
        Rotation in degrees, counter-clockwise as displayed; the canvas grows to hold it.

    Returns
    -------
    numpy.ndarray
        uint8 (h, w) intensity; h = w = side when angle is 0.
    """
    image = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    if angle:
        image = image.rotate(angle, resample=Image.BILINEAR, expand=True)
    return np.asarray(image)


def paste(canvas: np.ndarray, intensity: np.ndarray, centre: tuple[float, float], colour: np.ndarray) -> np.ndarray:
    """Paste a colourised item onto ``canvas`` in place and return its mask.

    Item pixels are ``255 * colour * (0.35 + 0.65 * intensity / 255)``: the colour carries the
    item's texture. Parts falling outside the canvas are clipped.

    Parameters
    ----------
    canvas
        float32 (H, W, 3) in [0, 255], modified in place.
    intensity
        uint8 (h, w) rendered item (see :func:`render_item`).
    centre
        (row, column) of the item's centre on the canvas, in pixels.
    colour
        float32 (3,) RGB in [0, 1].

    Returns
    -------
    numpy.ndarray
        bool (H, W), True exactly where item pixels were written.
    """
    height, width = canvas.shape[:2]
    top = int(round(centre[0] - intensity.shape[0] / 2))
    left = int(round(centre[1] - intensity.shape[1] / 2))
    mask = np.zeros((height, width), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + intensity.shape[0], height), min(left + intensity.shape[1], width)
    if y0 >= y1 or x0 >= x1:
        return mask
    patch = intensity[y0 - top:y1 - top, x0 - left:x1 - left].astype(np.float32)
    inside = patch >= MASK_THRESHOLD
    shade = (0.35 + 0.65 * patch[..., None] / 255.0) * colour * 255.0
    region = canvas[y0:y1, x0:x1]
    region[inside] = shade[inside]
    mask[y0:y1, x0:x1] = inside
    return mask


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """Half-open box ``(y0, x0, y1, x1)`` (int64) around a 2-D bool mask; zeros if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.int64)
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=np.int64)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """Round a float canvas in [0, 255] to uint8."""
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
