"""Which region of the input triggered one filter (thesis 6.3.2, "Visualising Surprise").

A filter flagged as surprising by the anomaly scorer is explained by the image region that
drives it. For each sample and its filter n at the target layer:

1. one forward pass, and dy_c/dA at the target layer for the class c;
2. every filter's gradient except filter n's is zeroed, and that is backpropagated to the
   input with *vanilla* gradients (no guided ReLU), so only pixels that reach the class
   score through filter n get a gradient;
3. the pixel score is max over colour channels of |gradient|, as for SWAG's pixel scores;
4. it is pooled (segment mean, eq. 3.1) into about 50 plain colour SLIC superpixels (or
   supervoxels over T x H x W for clips); the top-scoring segment is the region.

Surprise suppression (thesis 6.4.1, :func:`suppress_surprise`) is the counterfactual: delete the
region's superpixels, highest score first, one more at a time, and see whether and to what the
prediction changes. It needs the ground truth to say whether that "fixes" the input, so it is a
tool for audits with a label, not a runtime detector.

Why |gradient| and not its positive part: a vanilla gradient's sign at a pixel says whether
brightening or darkening that channel raises the score, which depends on the colour of the
pixel relative to the normalisation mean, not on whether the pixel belongs to the feature.
The magnitude measures how strongly the pixel acts through the filter; the max over channels
keeps a pixel whose effect sits in one channel only. This is the rule SWAG already uses for
its guided and vanilla pixel scores (:data:`explainserve.swag.PIXEL_SOURCES`).

Plain colour SLIC rather than the gradient-aware variants, and 50 rather than 300 segments,
follow the thesis: the region should line up with what is visible in the image and be one
contiguous part of it, so it can be compared with the filter's training exemplars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .grad_amap import grad_amap
from .limits import MAX_SUPPRESSION_STEPS, MAX_WEIGHT, max_segments
from .methods import SUPPRESSION_STEPS
from .probe import class_scores, eval_mode, probe
from .superpixels import gradient_slic
from .swag import segment_means

# Thesis 6.3.2: about 50 superpixels, so the top one is a single contiguous feature.
REGION_SEGMENTS = 50
# SLIC compactness m; the colour-only SLIC distance with wc = m is standard SLIC's.
REGION_COMPACTNESS = 10.0


@dataclass
class FilterRegion:
    """The region of one sample that triggered one target-layer filter.

    Attributes
    ----------
    filter : int
        The target-layer filter (channel) explained.
    target : int
        The class whose score was backpropagated.
    heatmap : ndarray of float32, shape (H, W) or (T, H, W)
        Each pixel's segment mean of the pixel scores (|d y_target / d x| through the filter,
        max over channels), in units of logit per unit of normalised input.
    pixel_scores : ndarray of float32, same shape
        The pixel scores before pooling.
    segments : ndarray of int32, same shape
        Superpixel (or supervoxel) label per pixel, 0..n-1.
    segment_scores : ndarray of float32, shape (n,)
        Mean pixel score per segment.
    top_segment : int
        Label of the highest-scoring segment: the region that triggered the filter.
    alpha : float
        The filter's Grad-AMap score for ``target`` in this pass (mean over space of A * dy/dA).
    """

    filter: int
    target: int
    heatmap: np.ndarray
    pixel_scores: np.ndarray
    segments: np.ndarray
    segment_scores: np.ndarray
    top_segment: int
    alpha: float

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask of the top segment, shape of ``segments``."""
        return self.segments == self.top_segment


def check_region_parameters(n_segments: int, compactness: float, spatial_shape: Sequence[int]) -> None:
    """Raise ValueError naming the parameter unless the SLIC settings fit the input size."""
    limit = max_segments(spatial_shape)
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or not 1 <= n_segments <= limit:
        raise ValueError(
            f"n_segments: expected an int in [1, {limit}] for an input of {tuple(spatial_shape)} pixels, got {n_segments!r}"
        )
    if not np.isfinite(compactness) or not 0 < compactness <= MAX_WEIGHT:  # the colour weight wc of colour-only SLIC
        raise ValueError(f"compactness: expected a value in (0, {MAX_WEIGHT:g}], got {compactness!r}")


def _rgb_for_slic(inputs: torch.Tensor, images: np.ndarray | None) -> np.ndarray:
    """RGB in [0, 1], (B, [T,] H, W, 3), from ``images`` or by rescaling each input sample."""
    expected = (inputs.shape[0], *inputs.shape[2:], 3)
    if images is None:
        if inputs.shape[1] != 3:
            raise ValueError(f"images: inputs have {inputs.shape[1]} channels; pass RGB images for the superpixels")
        rgb = inputs.detach().movedim(1, -1).double().cpu().numpy()
        flat = rgb.reshape(rgb.shape[0], -1)
        low = flat.min(axis=1).reshape(-1, *(1,) * (rgb.ndim - 1))
        span = np.maximum(flat.max(axis=1) - flat.min(axis=1), 1e-12).reshape(low.shape)
        return (rgb - low) / span
    images = np.asarray(images)
    if images.shape != expected:
        raise ValueError(f"images: expected shape {expected} (B, [T,] H, W, 3) matching the inputs, got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("images: expected uint8 or float RGB values in [0, 1]")
    return images.astype(np.float64)


def filter_regions(
    model: nn.Module,
    inputs: torch.Tensor,
    filters: int | Sequence[int] | torch.Tensor,
    *,
    target: int | Sequence[int | None] | torch.Tensor | None = None,
    images: np.ndarray | None = None,
    layer: str | None = None,
    n_segments: int = REGION_SEGMENTS,
    compactness: float = REGION_COMPACTNESS,
    temporal_spacing: float = 1.0,
    segments: Sequence[np.ndarray] | None = None,
) -> list[FilterRegion]:
    """Find, per sample, the superpixel that triggered a target-layer filter (thesis 6.3.2).

    The whole batch takes one forward pass and one backward pass (to the target layer with
    ordinary gradients, then from filter ``filters[b]`` alone to the input with vanilla
    gradients), each sample with its own filter and class.

    Parameters
    ----------
    model : nn.Module
        Image (B, C, H, W) or video (B, C, T, H, W) classifier returning logits (B, N); run in
        eval mode, its training flags and hooks are left as found.
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W)
        Normalised input batch.
    filters : int or sequence of int, length B
        Target-layer filter per sample, in [0, K-1]; one int applies to every sample.
    target : int or sequence of (int or None), optional
        Class whose score is backpropagated, per sample; the predicted class by default
        (and for None entries). For a surprising filter, the class it was scored against.
    images : ndarray, shape (B, H, W, 3) or (B, T, H, W, 3), optional
        The inputs as RGB, uint8 or float in [0, 1], for the superpixels. By default each
        input sample is rescaled to [0, 1] by its own min and max (which keeps colours only
        when the normalisation is the same for every channel).
    layer : str, optional
        Target layer; the architecture's default (see :func:`explainserve.layers.default_target_layer`).
    n_segments : int
        Approximate number of superpixels (supervoxels for clips), at most a quarter of the
        pixels of one sample (and 10000); 50 by default, as in the thesis.
    compactness : float
        SLIC compactness m in (0, 1000]: colour distance is divided by it.
    temporal_spacing : float
        Clips only: the distance of one frame step in pixels, see
        :func:`explainserve.superpixels.gradient_slic`.
    segments : sequence of int ndarray, optional
        Precomputed segment labels per sample (they depend on the image only); SLIC is
        skipped for them.

    Returns
    -------
    list of FilterRegion, one per sample

    Raises
    ------
    ValueError
        Naming the parameter: bad input rank, channels or NaN/Inf; filter out of range or a
        filter count other than B; bad class id; ``n_segments`` or ``compactness`` out of
        range; ``images`` or ``segments`` of the wrong shape; unknown layer.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs: expected a tensor of shape (B, C, H, W) or (B, C, T, H, W), got {shape}")
    spatial = tuple(inputs.shape[2:])
    check_region_parameters(n_segments, compactness, spatial)
    rgb = _rgb_for_slic(inputs, images) if segments is None else None
    if segments is not None:
        segments = [np.asarray(s) for s in segments]
        if len(segments) != inputs.shape[0] or any(s.shape != spatial or s.dtype.kind not in "iu" for s in segments):
            raise ValueError(f"segments: expected {inputs.shape[0]} integer label arrays of shape {spatial}")

    result = probe(model, inputs, layer=layer, target=target, input_gradient=False, filters=filters)
    # Max over channels of |gradient|: SWAG's rule for its gradient pixel scores.
    scores = result.filter_gradient.abs().amax(dim=1).float().cpu().numpy()
    rows = torch.arange(inputs.shape[0], device=result.filters.device)
    alphas = grad_amap(result.activations, result.activation_gradients)[rows, result.filters]

    regions = []
    for b in range(inputs.shape[0]):
        labels = segments[b] if segments is not None else gradient_slic(
            rgb[b], None, variant="i", n_segments=int(n_segments), wc=float(compactness), temporal_spacing=temporal_spacing)
        means = segment_means(scores[b], labels)
        regions.append(FilterRegion(
            filter=int(result.filters[b]),
            target=int(result.target[b]),
            heatmap=means[labels],
            pixel_scores=scores[b],
            segments=labels.astype(np.int32),
            segment_scores=means,
            top_segment=int(np.argmax(means)),
            alpha=float(alphas[b]),
        ))
    return regions


@dataclass
class Suppression:
    """The prediction as a region's superpixels are deleted one more at a time (thesis 6.4.1).

    Attributes
    ----------
    original : int
        The class predicted on the intact input.
    deleted_segments : ndarray of int32, shape (k,)
        Segment labels deleted, highest segment score first, up to and including the step at
        which the prediction changed (all the steps tried when it never did).
    predicted : ndarray of int64, shape (k,)
        The class predicted after each deletion step.
    probabilities : ndarray of float32, shape (k,)
        Score of ``original`` after each step: its softmax probability, or its sigmoid for a
        multi-label model.
    """

    original: int
    deleted_segments: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray

    @property
    def changed(self) -> bool:
        """Whether deleting the segments changed the prediction."""
        return bool(len(self.predicted)) and int(self.predicted[-1]) != self.original

    @property
    def predicted_after(self) -> int:
        """The class predicted after the last deletion step (``original`` if none was tried)."""
        return int(self.predicted[-1]) if len(self.predicted) else self.original


def suppress_surprise(
    model: nn.Module,
    inputs: torch.Tensor,
    regions: Sequence[FilterRegion],
    *,
    steps: int = SUPPRESSION_STEPS,
    multi_label: bool = False,
) -> list[Suppression]:
    """Delete each region's top superpixels one more at a time until the prediction changes.

    Deleting sets the pixels (voxels) of a segment to 0 in normalised input space, the
    training mean, as the thesis does. Every step of every sample runs in one batched
    forward pass without gradients.

    Parameters
    ----------
    model : nn.Module
        The classifier the regions were found on; run in eval mode, its flags left as found.
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W)
        The normalised inputs the regions belong to.
    regions : sequence of FilterRegion, length B
        Each sample's region (:func:`filter_regions`); its ``segments`` and ``segment_scores``
        order the deletions.
    steps : int
        The most segments deleted per sample, in [1, ``MAX_SUPPRESSION_STEPS``] (100); fewer
        when a sample has fewer segments.
    multi_label : bool
        Score the classes with each logit's sigmoid rather than the softmax
        (:func:`~explainserve.probe.class_scores`); the predictions are the same.

    Returns
    -------
    list of Suppression, one per sample

    Raises
    ------
    ValueError
        Naming the parameter: ``steps`` out of range, a region count other than B, or
        segments whose shape differs from the inputs'.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_SUPPRESSION_STEPS:
        raise ValueError(f"steps: expected an int in [1, {MAX_SUPPRESSION_STEPS}], got {steps!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
        raise ValueError("inputs: expected a tensor of shape (B, C, H, W) or (B, C, T, H, W)")
    if len(regions) != inputs.shape[0]:
        raise ValueError(f"regions: expected one per sample ({inputs.shape[0]}), got {len(regions)}")
    spatial = tuple(inputs.shape[2:])
    variants, orders = [], []
    for sample, region in zip(inputs, regions):
        segments = torch.as_tensor(np.asarray(region.segments, dtype=np.int64), device=sample.device)
        if tuple(segments.shape) != spatial:
            raise ValueError(f"regions: segments of shape {tuple(segments.shape)} for inputs of {spatial}")
        order = np.argsort(-np.asarray(region.segment_scores), kind="stable")[:steps]
        orders.append(order.astype(np.int32))
        deleted = torch.zeros(spatial, dtype=torch.bool, device=sample.device)
        variants.append(sample)  # step 0: the intact input
        for segment in order:
            deleted |= segments == int(segment)
            variants.append(sample.masked_fill(deleted, 0.0))  # (C, ...) masked over every channel
    with torch.no_grad(), eval_mode(model):
        logits = model(torch.stack(variants)).float().cpu()
    # Predictions from the logits: saturated float32 scores (sigmoids at 1.0) can tie where they differ.
    probabilities = class_scores(logits, multi_label)
    suppressions, start = [], 0
    for order in orders:
        block, scores = logits[start:start + len(order) + 1], probabilities[start:start + len(order) + 1]
        start += len(order) + 1
        original = int(block[0].argmax())
        predicted = block[1:].argmax(dim=1).numpy()
        changed = np.flatnonzero(predicted != original)
        taken = int(changed[0]) + 1 if len(changed) else len(order)
        suppressions.append(Suppression(
            original=original,
            deleted_segments=order[:taken],
            predicted=predicted[:taken].astype(np.int64),
            probabilities=scores[1:taken + 1, original].numpy().astype(np.float32),
        ))
    return suppressions
