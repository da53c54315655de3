"""Weak localisation by thresholding explanations (thesis 3.5.3, 4.5.3, 5.4.4).

An explanation is min-max normalised to [0, 1] and thresholded by one of three families
(Fong and Vedaldi):

- ``value``:  keep positions with value >= t, t in [0 : 0.05 : 0.95];
- ``mean``:   keep positions with value >= a * mean, a in [0 : 0.5 : 10];
- ``energy``: keep the highest positions until they hold a fraction e of the total,
  e in [0 : 0.05 : 0.95] (the top position is always kept).

The bounding box of the largest connected region (8-connectivity) is compared with the
ground-truth box; IoU > 0.5 counts as correct. For a clip, the thresholds are applied to the
whole clip, a box is drawn in every frame, and the clip is correct when the mean per-frame IoU
exceeds 0.5. The error of a method is reported at its best threshold.

Boxes are ``(y0, x0, y1, x1)`` in pixels, half-open (rows y0..y1-1, columns x0..x1-1), as the
datasets in ``explainserve.data`` give them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.measure import label, regionprops

from explainserve.evaluation.checks import as_numpy, check_batch, check_finite, check_same_spatial

THRESHOLDS = {
    "value": np.round(np.arange(0, 0.951, 0.05), 2),
    "mean": np.round(np.arange(0, 10.01, 0.5), 2),
    "energy": np.round(np.arange(0, 0.951, 0.05), 2),
}
CORRECT_IOU = 0.5


@dataclass(frozen=True)
class LocalisationResult:
    """Outcome of one threshold family over a batch.

    Attributes
    ----------
    thresholds : (n,) the family's threshold values.
    iou : (B, n) IoU per sample and threshold (mean over frames for clips).
    error : (n,) localisation error in % per threshold (IoU <= 0.5 counts as an error).
    best_threshold : threshold with the lowest error (the first on ties).
    best_error : that lowest error, in %.
    """

    thresholds: np.ndarray
    iou: np.ndarray
    error: np.ndarray
    best_threshold: float
    best_error: float


def normalise(explanation: np.ndarray) -> np.ndarray:
    """Min-max scale one explanation to [0, 1]; a constant map becomes all zeros."""
    low, high = float(explanation.min()), float(explanation.max())
    if high == low:
        return np.zeros_like(explanation, dtype=np.float64)
    return (explanation.astype(np.float64) - low) / (high - low)


def threshold_masks(explanation: np.ndarray, family: str) -> np.ndarray:
    """Binary masks of one explanation for every threshold of ``family``.

    Parameters
    ----------
    explanation : (*S) finite array, S = (H, W) or (T, H, W).
    family : "value", "mean" or "energy".

    Returns
    -------
    (n, *S) bool array, one mask per threshold in ``THRESHOLDS[family]``.
    """
    if family not in THRESHOLDS:
        raise ValueError(f"family must be one of {tuple(THRESHOLDS)}, got {family!r}")
    values = normalise(explanation)
    levels = THRESHOLDS[family]
    if family == "value":
        return values[None] >= levels.reshape(-1, *([1] * values.ndim))
    if family == "mean":
        return values[None] >= (levels * values.mean()).reshape(-1, *([1] * values.ndim))
    flat = values.reshape(-1)
    total = flat.sum()
    if total == 0:
        return np.ones((len(levels), *values.shape), dtype=bool)
    order = np.argsort(-flat, kind="stable")
    energy_before = (np.cumsum(flat[order]) - flat[order]) / total
    kept_ranked = energy_before[None] < levels[:, None]
    kept_ranked[:, 0] = True
    masks = np.empty_like(kept_ranked)
    masks[:, order] = kept_ranked
    return masks.reshape(len(levels), *values.shape)


def largest_region_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Half-open box (y0, x0, y1, x1) of the largest 8-connected region of a (H, W) mask, or None."""
    regions = regionprops(label(mask, connectivity=2))
    if not regions:
        return None
    return tuple(int(v) for v in max(regions, key=lambda region: region.area).bbox)


def box_iou(box_a, box_b) -> float:
    """Intersection over union of two half-open boxes (y0, x0, y1, x1); 0 when either is None."""
    if box_a is None or box_b is None:
        return 0.0
    ay0, ax0, ay1, ax1 = box_a
    by0, bx0, by1, bx1 = box_b
    overlap = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - overlap
    return overlap / union if union > 0 else 0.0


def _check_boxes(boxes: np.ndarray, frame_shape: tuple[int, int]) -> None:
    height, width = frame_shape
    y0, x0, y1, x1 = (boxes[..., i] for i in range(4))
    if ((x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height) | (x1 <= x0) | (y1 <= y0)).any():
        raise ValueError(
            f"boxes must be half-open (y0, x0, y1, x1) with 0 <= y0 < y1 <= {height} and 0 <= x0 < x1 <= {width}"
        )


def weak_localisation(maps, boxes, family: str = "value") -> LocalisationResult:
    """Localisation error of image or clip explanations for one threshold family.

    Parameters
    ----------
    maps : (B, H, W) image explanations or (B, T, H, W) clip explanations.
    boxes : (B, 4) ground-truth boxes, or (B, T, 4) one per frame for clips.
    family : "value", "mean" or "energy".

    Returns
    -------
    LocalisationResult.
    """
    maps = as_numpy(maps, "maps")
    boxes = as_numpy(boxes, "boxes")
    check_batch("maps", maps, (3, 4))
    check_finite("maps", maps)
    expected = (maps.shape[0], 4) if maps.ndim == 3 else (maps.shape[0], maps.shape[1], 4)
    if boxes.shape != expected:
        raise ValueError(f"boxes must have shape {expected} for maps of shape {maps.shape}, got {boxes.shape}")
    _check_boxes(boxes, maps.shape[-2:])
    levels = THRESHOLDS.get(family)
    if levels is None:
        raise ValueError(f"family must be one of {tuple(THRESHOLDS)}, got {family!r}")
    iou = np.zeros((maps.shape[0], len(levels)))
    for b, explanation in enumerate(maps):
        masks = threshold_masks(explanation, family)
        frame_boxes = boxes[b].reshape(-1, 4)
        frame_masks = masks.reshape(len(levels), len(frame_boxes), *maps.shape[-2:])
        for t in range(len(levels)):
            iou[b, t] = np.mean(
                [box_iou(largest_region_box(mask), tuple(box)) for mask, box in zip(frame_masks[t], frame_boxes)]
            )
    error = 100.0 * (iou <= CORRECT_IOU).mean(axis=0)
    best = int(np.argmin(error))
    return LocalisationResult(levels, iou, error, float(levels[best]), float(error[best]))


def pointing_game(maps, masks, tolerance: float = 15.0) -> np.ndarray:
    """Hits of the pointing game (thesis 5.4.4.1): is the map's maximum within ``tolerance`` px of the object?

    Parameters
    ----------
    maps : (B, H, W) explanations; the first maximum in raster order is the pointed position.
    masks : (B, H, W) bool object masks, each non-empty.
    tolerance : distance in pixels (Euclidean) allowed between the point and the mask, >= 0.

    Returns
    -------
    (B,) bool array of hits; the accuracy is its mean.
    """
    maps = as_numpy(maps, "maps")
    masks = as_numpy(masks, "masks").astype(bool)
    check_batch("maps", maps, (3,))
    check_finite("maps", maps)
    check_same_spatial("masks", masks, "maps", maps.shape)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.any():
        raise ValueError(f"masks must each contain the object; sample {int(np.flatnonzero(empty)[0])} is empty")
    hits = np.empty(len(maps), dtype=bool)
    for b, (explanation, mask) in enumerate(zip(maps, masks)):
        row, col = np.unravel_index(np.argmax(explanation), explanation.shape)
        hits[b] = distance_transform_edt(~mask)[row, col] <= tolerance
    return hits
