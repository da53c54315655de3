"""Overlay pictures: a heatmap blended on the input, with SWAG segment borders drawn."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries
from skimage.transform import resize

BORDER_COLOUR = (255, 255, 255)


def overlay(image: np.ndarray, heatmap: np.ndarray, segments: np.ndarray | None = None,
            opacity: float = 0.5, colormap: str = "jet", min_side: int = 256) -> np.ndarray:
    """Blend a heatmap on an image.

    Parameters
    ----------
    image : uint8 (H, W, 3)
    heatmap : float (h, w); resized to (H, W) bilinearly and normalised to [0, 1]
    segments : int (h, w), optional; their borders are drawn in white (nearest-neighbour resize)
    opacity : float in [0, 1], weight of the heatmap
    min_side : int
        Smaller images are first enlarged by a whole factor (nearest neighbour), so that
        segment borders stay thin next to the segments.

    Returns
    -------
    uint8 (f*H, f*W, 3), f = 1 or the enlargement factor
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity: expected a value in [0, 1], got {opacity}")
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {image.shape}")
    factor = max(1, -(-min_side // min(image.shape[:2])))
    image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    size = image.shape[:2]
    heat = resize(np.asarray(heatmap, dtype=np.float64), size, order=1, mode="edge", anti_aliasing=False)
    low, high = heat.min(), heat.max()
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    colours = colormaps[colormap](heat)[..., :3] * 255
    blended = ((1 - opacity) * image + opacity * colours).round().clip(0, 255).astype(np.uint8)
    if segments is not None:
        labels = resize(np.asarray(segments), size, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
        blended[find_boundaries(labels, mode="inner")] = BORDER_COLOUR
    return blended


def overlay_clip(clip: np.ndarray, heatmap: np.ndarray, segments: np.ndarray | None = None,
                 max_frames: int = 8, **kwargs) -> np.ndarray:
    """Overlay each of up to ``max_frames`` evenly spaced frames and tile them in a row.

    clip : uint8 (T, H, W, 3); heatmap (T', h, w) and segments share the map's frame count.
    """
    clip = np.asarray(clip, dtype=np.uint8)
    frames = np.linspace(0, clip.shape[0] - 1, min(max_frames, clip.shape[0])).round().astype(int)
    tiles = []
    for t in frames:
        t_map = int(round(t * (heatmap.shape[0] - 1) / max(clip.shape[0] - 1, 1)))
        tiles.append(overlay(clip[t], heatmap[t_map], None if segments is None else segments[t_map], **kwargs))
    return np.concatenate(tiles, axis=1)


def save_png(picture: np.ndarray, path) -> None:
    Image.fromarray(picture).save(path, format="PNG")
