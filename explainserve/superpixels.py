"""Gradient-aware SLIC superpixels and supervoxels (thesis eq. 3.2-3.6).

The thesis distance is D' = sqrt((dc/wc)^2 + (ds/ws)^2 + (dg/wg)^2) with dc the CIELAB
distance, dg the distance in the pixel scores M rescaled to [0, 100], and ws = S = sqrt(N/K).
scikit-image's SLIC minimises exactly this when given the stacked features
F = [LAB/wc, M/wg] and ``compactness = 1/(F.max() - F.min())``: it rescales F to [0, 1] by
its global range and then divides by the compactness, which restores F, while the spatial
term is (ds/S)^2. Variants drop a term: "i" keeps colour only, "g" the scores only.

Degenerate inputs. On noise (or a clip of identical noisy frames) the thesis's weights let the
feature term swamp the spatial one: SLIC's clusters fragment, and enforcing connectivity merges
the fragments until one segment covers the whole input. A segmentation with fewer than
``MIN_SEGMENT_FRACTION`` of the requested segments is redone with the feature term scaled down by
``RETRY_SCALE`` (up to ``MAX_RETRIES`` times), and finally on position alone (a regular grid),
so a request for K > 1 segments never gets one.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab
from skimage.segmentation import slic

from .limits import MAX_SEGMENTS, check_weight

VARIANTS = ("i", "g", "i_g")
# SLIC's k-means is not at a fixed point after scikit-image's 10 iterations. On images cut into at
# least SHORT_SLIC_MIN_SEGMENTS superpixels (the default from 224 x 224 up), SHORT_SLIC_ITERATIONS
# change them less than 10 more iterations would, and the SWAG map hardly at all
# (tests/unit/test_slic_iterations.py), for 40 % less SLIC time. Fewer, larger superpixels (24 at
# 64 x 64) and clips fail that check and keep 10.
SLIC_ITERATIONS = 10
SHORT_SLIC_ITERATIONS = 6
SHORT_SLIC_MIN_SEGMENTS = 300
# Fewer segments than this fraction of the requested number means SLIC collapsed (module docstring).
MIN_SEGMENT_FRACTION = 1 / 8
RETRY_SCALE = 4.0
MAX_RETRIES = 3


def check_superpixel_parameters(n_segments: int, wc: float, wg: float, variant: str) -> None:
    """Raise ValueError naming the parameter and its accepted range."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or not 1 <= n_segments <= MAX_SEGMENTS:
        raise ValueError(f"n_segments: expected an int in [1, {MAX_SEGMENTS}], got {n_segments!r}")
    check_weight("wc", wc)
    check_weight("wg", wg)


def slic_iterations(kind: str, n_segments: int) -> int:
    """SLIC's iteration count as served: ``SHORT_SLIC_ITERATIONS`` for an image cut into at least
    ``SHORT_SLIC_MIN_SEGMENTS`` superpixels, ``SLIC_ITERATIONS`` otherwise (module constants).

    Parameters
    ----------
    kind : {"image", "video"}
    n_segments : int
        The requested superpixel (or supervoxel) count K.
    """
    return SHORT_SLIC_ITERATIONS if kind == "image" and n_segments >= SHORT_SLIC_MIN_SEGMENTS else SLIC_ITERATIONS


def rescale_scores(scores: np.ndarray) -> np.ndarray:
    """Map pixel scores linearly onto [0, 100], the range of CIELAB lightness (0 if constant)."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = scores.min(), scores.max()
    if high == low:
        return np.zeros_like(scores)
    return (scores - low) * (100.0 / (high - low))


def slic_features(image: np.ndarray | None, scores: np.ndarray | None, *, variant: str, wc: float, wg: float) -> np.ndarray:
    """Stack the weighted SLIC features F = [LAB/wc, M/wg] (or one of them) on a last axis.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3) or (T, H, W, 3), float in [0, 1], or None for variant "g"
        RGB image or clip.
    scores : ndarray, shape (H, W) or (T, H, W), or None for variant "i"
        Pixel scores M (any non-negative scale; rescaled to [0, 100]).
    """
    parts = []
    # float32 halves the cost of the colour conversion and of SLIC's inner loop.
    if variant in ("i", "i_g"):
        parts.append(rgb2lab(np.asarray(image, dtype=np.float32)) / np.float32(wc))
    if variant in ("g", "i_g"):
        parts.append((rescale_scores(scores)[..., None] / wg).astype(np.float32))
    return np.concatenate(parts, axis=-1)


def gradient_slic(
    image: np.ndarray | None,
    scores: np.ndarray | None,
    *,
    variant: str = "i_g",
    n_segments: int = 300,
    wc: float = 10.0,
    wg: float = 10.0,
    temporal_spacing: float = 1.0,
    enforce_connectivity: bool = True,
    max_num_iter: int = SLIC_ITERATIONS,
) -> np.ndarray:
    """Segment an image (or clip) with the thesis's gradient-aware SLIC distance.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3) or (T, H, W, 3), float RGB in [0, 1]
        Needed by variants "i" and "i_g".
    scores : ndarray, shape (H, W) or (T, H, W)
        Pixel scores M; needed by variants "g" and "i_g".
    variant : {"i", "g", "i_g"}
        Colour only (SWAG_I), scores only (SWAG_G), or both (SWAG_I+G).
    n_segments : int
        Approximate number of superpixels K, in [1, 10000].
    wc, wg : float
        Colour and score weights; a larger weight lowers that term's influence.
    temporal_spacing : float
        Clips only: distance of one frame step in pixels. scikit-image seeds a regular grid
        and keeps a single seed layer along an axis shorter than its grid step (a 16-frame
        clip often gets one), so the time axis is weighted on purpose: 1 treats a frame like a
        pixel step, lower values stretch supervoxels into tubes along time.
    enforce_connectivity, max_num_iter
        Passed to :func:`skimage.segmentation.slic`.

    Returns
    -------
    ndarray of int32, shape (H, W) or (T, H, W)
        Segment labels starting at 0; never a single segment when ``n_segments`` > 1 (see the
        module docstring for what happens on noise and flat inputs).
    """
    check_superpixel_parameters(n_segments, wc, wg, variant)
    features = slic_features(image, scores, variant=variant, wc=wc, wg=wg)
    spacing = None if features.ndim == 3 else np.array([temporal_spacing, 1.0, 1.0])
    options = {"n_segments": int(n_segments), "spacing": spacing, "enforce_connectivity": enforce_connectivity,
               "max_num_iter": max_num_iter}
    labels = _slic(features, **options)
    for _ in range(MAX_RETRIES):
        if not _collapsed(labels, n_segments):
            return labels
        features = features / np.float32(RETRY_SCALE)
        labels = _slic(features, **options)
    if _collapsed(labels, n_segments):
        labels = _slic(np.zeros_like(features[..., :1]), **options)
    return labels


def _collapsed(labels: np.ndarray, n_segments: int) -> bool:
    found = int(labels.max()) + 1
    return n_segments > 1 and found < max(2, int(np.ceil(n_segments * MIN_SEGMENT_FRACTION)))


def _slic(features: np.ndarray, *, n_segments: int, spacing, enforce_connectivity: bool, max_num_iter: int) -> np.ndarray:
    value_range = float(features.max() - features.min())
    labels = slic(
        features,
        n_segments=n_segments,
        # Undo skimage's global rescale to [0, 1] so the feature scale is the thesis's.
        compactness=1.0 / value_range if value_range > 0 else 1.0,
        convert2lab=False,
        channel_axis=-1,
        start_label=0,
        spacing=spacing,
        enforce_connectivity=enforce_connectivity,
        max_num_iter=max_num_iter,
    )
    return labels.astype(np.int32)
