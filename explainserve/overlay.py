"""Pictures a person can read: explanation maps, surprise regions and clips.

Every picture puts the untouched original on the left and, beside it, the same input dimmed
with the explanation drawn over it; text sits in a band above or below, never on the input.

- :func:`explanation_picture`: original | heatmap over the dimmed original | colour bar. The
  heatmap is semi-transparent in proportion to its value, so cold areas show the input. SWAG
  segments get thin light outlines; the ``top`` segments by score a solid outline.
- :func:`region_picture`: original | dimmed original with the region that triggered a filter
  left bright and outlined, and a caption naming the filter, its training exemplars and, with a
  label, the counterfactual (:func:`counterfactual_text`).
- :func:`explanation_strip` and :func:`region_strip`: the same for clips, as a strip of evenly
  spaced frames (originals above, explanations below), normalised over the whole clip.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_dilation
from skimage.segmentation import find_boundaries
from skimage.transform import resize

BACKGROUND = 255                 # white bands and gaps
GAP = 6                          # pixels between panels
DIM = 0.45                       # brightness of the original under a heatmap or around a region
COLORMAP = "inferno"
SEGMENT_OUTLINE = (235, 235, 235)
SEGMENT_OUTLINE_WEIGHT = 0.45    # light: blended, not painted
TOP_OUTLINE = (0, 220, 255)      # cyan stands apart from inferno's reds and yellows
REGION_OUTLINE = (0, 255, 120)
COLOUR_BAR_WIDTH = 14
TEXT_SIZE = 12
LINE_HEIGHT = 16


def explanation_picture(image: np.ndarray, heatmap: np.ndarray, segments: np.ndarray | None = None,
                        segment_scores: np.ndarray | None = None, *, top: int = 3, opacity: float = 0.75,
                        title: str = "", min_side: int = 256, with_original: bool = True) -> np.ndarray:
    """Original beside its explanation, with a colour bar.

    Parameters
    ----------
    image : uint8 (H, W, 3)
    heatmap : float (h, w); resized bilinearly to (H, W) and normalised to [0, 1] by its range
    segments : int (h, w), optional; superpixel labels (nearest-neighbour resize)
    segment_scores : float (n_segments,), optional; ranks the segments (default: their mean heat)
    top : int >= 0, segments outlined solidly, best first
    opacity : float in [0, 1], the heatmap's weight where it is highest
    title : str, written in a band above the panels
    min_side : int; smaller inputs are enlarged by a whole factor (nearest neighbour) first
    with_original : bool; False leaves the original out (a gallery shows it apart)

    Returns
    -------
    uint8 (rows, columns, 3): [title band] over original | explanation | colour bar.
    The original panel holds the enlarged input unchanged.
    """
    check_fraction("opacity", opacity)
    image = enlarge(check_image(image), min_side)
    heat = normalised(resize_to(heatmap, image.shape[:2], order=1))
    labels = None if segments is None else resize_to(segments, image.shape[:2], order=0).astype(np.int64)
    panel = heat_panel(image, heat, labels, segment_scores, top, opacity)
    row = hstack([image] * with_original + [panel, colour_bar(image.shape[0], heatmap)])
    return with_text(row, above=[title] if title else [])


def explanation_strip(clip: np.ndarray, heatmap: np.ndarray, segments: np.ndarray | None = None,
                      segment_scores: np.ndarray | None = None, *, max_frames: int = 8, top: int = 3,
                      opacity: float = 0.75, title: str = "", min_side: int = 128,
                      with_original: bool = True) -> np.ndarray:
    """:func:`explanation_picture` for a clip: originals above, explanations below, one colour bar.

    clip : uint8 (T, H, W, 3); heatmap float (T', h, w) and segments int (T', h, w) share the
    map's frame count, matched to the clip's frames by position. The heatmap is normalised over
    the whole clip, so frames compare; ``top`` supervoxels are outlined wherever they appear.
    """
    check_fraction("opacity", opacity)
    clip = check_clip(clip)
    heat_all = normalised(np.asarray(heatmap, dtype=np.float64))
    ranked = top_labels(segments, segment_scores, heatmap, top)
    originals, panels = [], []
    for t, t_map in strip_frames(clip.shape[0], heat_all.shape[0], max_frames):
        frame = enlarge(clip[t], min_side)
        heat = resize_to(heat_all[t_map], frame.shape[:2], order=1).clip(0, 1)
        labels = None if segments is None else resize_to(segments[t_map], frame.shape[:2], order=0).astype(np.int64)
        originals.append(frame)
        panels.append(heat_panel(frame, heat, labels, None, 0, opacity, outlined=ranked))
    grid = vstack([hstack(originals)] * with_original + [hstack(panels)])
    return with_text(hstack([grid, colour_bar(grid.shape[0], heatmap)]), above=[title] if title else [])


def region_picture(image: np.ndarray, segments: np.ndarray, region: int, caption: Sequence[str] = (),
                   *, min_side: int = 256, with_original: bool = True) -> np.ndarray:
    """Original beside the region (segment ``region`` of ``segments``) kept bright and outlined.

    image : uint8 (H, W, 3); segments int (h, w), resized nearest-neighbour to (H, W);
    caption : lines written in a band below (see :func:`region_caption`).
    Returns uint8 (rows, columns, 3): original | region, over the caption band.
    """
    image = enlarge(check_image(image), min_side)
    labels = resize_to(segments, image.shape[:2], order=0).astype(np.int64)
    return with_text(hstack([image] * with_original + [region_panel(image, labels == region)]), below=list(caption))


def region_strip(clip: np.ndarray, segments: np.ndarray, region: int, caption: Sequence[str] = (),
                 *, max_frames: int = 8, min_side: int = 128, with_original: bool = True) -> np.ndarray:
    """:func:`region_picture` for a clip: originals above, the supervoxel ``region`` outlined below.

    clip : uint8 (T, H, W, 3); segments int (T', h, w), matched to the frames by position.
    """
    clip = check_clip(clip)
    originals, panels = [], []
    for t, t_map in strip_frames(clip.shape[0], np.asarray(segments).shape[0], max_frames):
        frame = enlarge(clip[t], min_side)
        labels = resize_to(segments[t_map], frame.shape[:2], order=0).astype(np.int64)
        originals.append(frame)
        panels.append(region_panel(frame, labels == region))
    return with_text(vstack([hstack(originals)] * with_original + [hstack(panels)]), below=list(caption))


def frame_strip(clip: np.ndarray, *, max_frames: int = 8, min_side: int = 128) -> np.ndarray:
    """The frames :func:`explanation_strip` picks, side by side, untouched: uint8 (H', W', 3)."""
    clip = check_clip(clip)
    return hstack([enlarge(clip[t], min_side) for t, _ in strip_frames(clip.shape[0], clip.shape[0], max_frames)])


def region_caption(filter_index: int, class_name: str, exemplars: Sequence[int], alpha: float | None = None,
                   counterfactual: str = "") -> list[str]:
    """The lines under a region picture: which filter, for which class, its training exemplars."""
    score = f" (alpha {alpha:.3g})" if alpha is not None else ""
    ids = ", ".join(str(int(i)) for i in exemplars) or "none stored"
    lines = [f"region that triggered filter {filter_index}{score}, surprising for class {class_name}",
             f"training images that most activate it: {ids}"]
    return lines + ([counterfactual] if counterfactual else [])


def counterfactual_text(deleted: int, prediction_changed: bool, predicted_after: str, label: str,
                        label_restored: bool) -> str:
    """One sentence for a surprise suppression (thesis 6.4.1): what deleting the region did."""
    if not prediction_changed:
        return f"deleting its top {deleted} superpixels does not change the prediction (label: {label})"
    outcome = "the label is restored" if label_restored else f"not the label {label}"
    return f"deleting its top {deleted} superpixels changes the prediction to {predicted_after}: {outcome}"


def save_png(picture: np.ndarray, path) -> None:
    Image.fromarray(picture).save(path, format="PNG")


# -- panels -------------------------------------------------------------------------------------

def heat_panel(image: np.ndarray, heat: np.ndarray, labels: np.ndarray | None, segment_scores, top: int,
               opacity: float, outlined: np.ndarray | None = None) -> np.ndarray:
    """The dimmed image under the heatmap (alpha = opacity * heat), light segment outlines and
    solid outlines around the ``top`` segments (or the given ``outlined`` labels)."""
    alpha = (opacity * heat)[..., None]
    colours = colormaps[COLORMAP](heat)[..., :3] * 255
    panel = (1 - alpha) * DIM * image + alpha * colours
    if labels is not None:
        edges = find_boundaries(labels, mode="inner")
        panel[edges] = (1 - SEGMENT_OUTLINE_WEIGHT) * panel[edges] + SEGMENT_OUTLINE_WEIGHT * np.array(SEGMENT_OUTLINE)
        if outlined is None:
            outlined = top_labels(labels, segment_scores, heat, top)
        if len(outlined):
            panel[find_boundaries(np.isin(labels, outlined), mode="inner")] = TOP_OUTLINE
    return panel.round().clip(0, 255).astype(np.uint8)


def region_panel(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed outside ``mask``, the mask's outline two pixels wide on its inner side."""
    panel = np.where(mask[..., None], image.astype(np.float64), DIM * image)
    outline = find_boundaries(np.pad(mask, 1), mode="inner")[1:-1, 1:-1]  # closed at the picture's edge too
    outline = binary_dilation(outline) & mask
    panel[outline] = REGION_OUTLINE
    return panel.round().astype(np.uint8)


def top_labels(segments, segment_scores, heatmap, top: int) -> np.ndarray:
    """Labels of the ``top`` segments by score (default: by the mean of ``heatmap`` over each)."""
    if segments is None or top <= 0:
        return np.zeros(0, np.int64)
    labels = np.asarray(segments).astype(np.int64)
    if segment_scores is None:
        heat = resize_to(heatmap, labels.shape, order=1) if np.shape(heatmap) != labels.shape else np.asarray(heatmap)
        ids = np.unique(labels)
        scores = np.array([heat[labels == i].mean() for i in ids])
    else:
        scores = np.asarray(segment_scores, dtype=np.float64)
        ids = np.arange(scores.size)
    return ids[np.argsort(-scores, kind="stable")[:top]]


def colour_bar(height: int, heatmap: np.ndarray) -> np.ndarray:
    """A vertical bar of the colour map, high at the top, labelled with the map's range."""
    ramp = np.linspace(1, 0, height)[:, None].repeat(COLOUR_BAR_WIDTH, axis=1)
    bar = (colormaps[COLORMAP](ramp)[..., :3] * 255).round().astype(np.uint8)
    values = np.asarray(heatmap, dtype=np.float64)
    labels = Image.new("RGB", (52, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(labels)
    draw.text((4, 0), f"{values.max():.3g}", fill=(0, 0, 0), font=font())
    draw.text((4, height - LINE_HEIGHT), f"{values.min():.3g}", fill=(0, 0, 0), font=font())
    return np.concatenate([bar, np.asarray(labels)], axis=1)


# -- layout -------------------------------------------------------------------------------------

def with_text(picture: np.ndarray, above: Sequence[str] = (), below: Sequence[str] = ()) -> np.ndarray:
    """``picture`` with bands of text lines above and below it (white, black text)."""
    def band(lines):
        canvas = Image.new("RGB", (picture.shape[1], LINE_HEIGHT * len(lines) + 4), (BACKGROUND,) * 3)
        draw = ImageDraw.Draw(canvas)
        for n, line in enumerate(lines):
            draw.text((2, 2 + n * LINE_HEIGHT), line, fill=(0, 0, 0), font=font())
        return np.asarray(canvas)
    return np.concatenate(([band(above)] if above else []) + [picture] + ([band(below)] if below else []), axis=0)


def hstack(pictures: Sequence[np.ndarray]) -> np.ndarray:
    """Side by side, top-aligned, GAP pixels apart, on the background."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + GAP * (len(pictures) - 1)
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    x = 0
    for picture in pictures:
        canvas[:picture.shape[0], x:x + picture.shape[1]] = picture
        x += picture.shape[1] + GAP
    return canvas


def vstack(pictures: Sequence[np.ndarray]) -> np.ndarray:
    """One above the other, left-aligned, GAP pixels apart."""
    return hstack([p.transpose(1, 0, 2) for p in pictures]).transpose(1, 0, 2)


def strip_frames(frames: int, map_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """(clip frame, map frame) pairs of up to ``max_frames`` evenly spaced frames."""
    picked = np.linspace(0, frames - 1, min(max_frames, frames)).round().astype(int)
    return [(int(t), int(round(t * (map_frames - 1) / max(frames - 1, 1)))) for t in picked]


def enlarge(image: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge by the smallest whole factor that makes the shorter side at least ``min_side``."""
    factor = max(1, -(-min_side // min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def resize_to(array, size: tuple[int, int], order: int) -> np.ndarray:
    """Bilinear (order 1) or nearest-neighbour (order 0) resize of a 2-D array to ``size``."""
    return resize(np.asarray(array, dtype=np.float64), size, order=order, mode="edge", anti_aliasing=False,
                  preserve_range=True)


def normalised(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


def check_clip(clip) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[3] != 3:
        raise ValueError(f"clip: expected uint8 (T, H, W, 3), got {clip.dtype} {clip.shape}")
    return clip


def check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")


def font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=TEXT_SIZE)
