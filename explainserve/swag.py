"""SWAG: superpixels weighted by gradients (thesis ch. 3, eq. 3.1; SWAG-V for clips, ch. 4).

Each superpixel R_i gets E_i = mean of the pixel scores M over R_i; the heatmap assigns E_i
to every pixel of R_i. M comes from a probe pass; its source is a parameter (the BMVC paper's
choices, §3), guided backprop by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cam import class_activation_map, gradcam_plus_plus_weights, gradcam_weights, upsample
from .grad_amap import grad_amap
from .probe import ProbeResult
from .superpixels import gradient_slic


@dataclass
class SwagResult:
    """A SWAG explanation.

    Attributes
    ----------
    heatmap : ndarray of float32, shape (H, W) or (T, H, W)
        E_i of the segment each pixel belongs to.
    segments : ndarray of int32, same shape
        Segment labels 0..n-1.
    segment_scores : ndarray of float32, shape (n,)
        E_i per segment.
    """

    heatmap: np.ndarray
    segments: np.ndarray
    segment_scores: np.ndarray


def segment_means(scores: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Mean of ``scores`` over each segment label 0..segments.max(), float32 (eq. 3.1)."""
    labels = segments.ravel()
    counts = np.bincount(labels)
    sums = np.bincount(labels, weights=np.asarray(scores, dtype=np.float64).ravel(), minlength=counts.size)
    return (sums / np.maximum(counts, 1)).astype(np.float32)


def swag(
    image: np.ndarray,
    scores: np.ndarray,
    *,
    variant: str = "i_g",
    segments: np.ndarray | None = None,
    **slic_options,
) -> SwagResult:
    """Superpixels weighted by gradients.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3) or (T, H, W, 3), float RGB in [0, 1]
    scores : ndarray, shape (H, W) or (T, H, W)
        Pixel scores M, e.g. from :func:`pixel_scores`.
    variant : {"i", "g", "i_g"}
        Superpixels from colour (SWAG_I), from the scores (SWAG_G) or both (SWAG_I+G).
    segments : ndarray of int, optional
        Precomputed segment labels (e.g. SWAG_I's, computed while the network ran).
    **slic_options
        n_segments, wc, wg, temporal_spacing: see :func:`explainserve.superpixels.gradient_slic`.
    """
    scores = np.asarray(scores)
    if scores.shape != image.shape[:-1]:
        raise ValueError(f"scores: shape {scores.shape} differs from the image's {image.shape[:-1]}")
    if segments is None:
        segments = gradient_slic(image, scores, variant=variant, **slic_options)
    means = segment_means(scores, segments)
    return SwagResult(heatmap=means[segments], segments=segments, segment_scores=means)


def _max_abs_over_channels(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.abs().amax(dim=1)


def _cam_at_input(result: ProbeResult, size, weights) -> torch.Tensor:
    return upsample(class_activation_map(result.activations, result.activation_gradients, weights), size)


def _act_grad_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    # Mean over space of A * dy/dA: the Grad-AMap score of each filter.
    return grad_amap(activations, gradients)


def _relu_activation(result: ProbeResult, size) -> torch.Tensor:
    return upsample(result.activations.clamp(min=0).mean(dim=1), size)


# Pixel-score sources of the BMVC paper (§3). Each maps (probe result, inputs) to (B, *spatial).
PIXEL_SOURCES = {
    "guided": lambda r, x: _max_abs_over_channels(r.input_gradient),
    "vanilla": lambda r, x: _max_abs_over_channels(r.vanilla_gradient),
    "input_x_gradient": lambda r, x: _max_abs_over_channels(x * r.vanilla_gradient),
    "relu_activation": lambda r, x: _relu_activation(r, x.shape[2:]),
    "grad_cam": lambda r, x: _cam_at_input(r, x.shape[2:], gradcam_weights),
    "guided_grad_cam": lambda r, x: _max_abs_over_channels(r.input_gradient) * _cam_at_input(r, x.shape[2:], gradcam_weights),
    "grad_cam_pp": lambda r, x: _cam_at_input(r, x.shape[2:], gradcam_plus_plus_weights),
    "act_grad_cam": lambda r, x: _cam_at_input(r, x.shape[2:], _act_grad_weights),
    "guided_act_grad_cam": lambda r, x: _max_abs_over_channels(r.input_gradient) * _cam_at_input(r, x.shape[2:], _act_grad_weights),
}
NEEDS_VANILLA = ("vanilla", "input_x_gradient")


def pixel_scores(result: ProbeResult, inputs: torch.Tensor, source: str = "guided") -> np.ndarray:
    """Pixel scores M for SWAG from a probe pass.

    Parameters
    ----------
    result : ProbeResult
        The probe pass of ``inputs`` (with ``vanilla_gradient=True`` for the sources in
        ``NEEDS_VANILLA``).
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W)
        The normalised inputs of the pass.
    source : str
        One of ``PIXEL_SOURCES``: "guided" (default, max over channels of |guided gradient|),
        "vanilla", "input_x_gradient", "relu_activation", "grad_cam", "guided_grad_cam",
        "grad_cam_pp", "act_grad_cam", "guided_act_grad_cam".

    Returns
    -------
    ndarray of float32, shape (B, H, W) or (B, T, H, W)
    """
    if source not in PIXEL_SOURCES:
        raise ValueError(f"source: expected one of {sorted(PIXEL_SOURCES)}, got {source!r}")
    if source in NEEDS_VANILLA and result.vanilla_gradient is None:
        raise ValueError(f"source: {source!r} needs probe(..., vanilla_gradient=True)")
    if source.startswith("guided") and result.input_gradient is None:
        raise ValueError(f"source: {source!r} needs probe(..., input_gradient=True)")
    return PIXEL_SOURCES[source](result, inputs).float().cpu().numpy()
