"""How well a method ranks superpixels (BMVC paper, Tables 1 and 2).

- Superpixel removal: remove (set to 0) superpixels one at a time, best-first or worst-first,
  and report the fraction removed when the predicted class first changes. Best-first: lower
  is better; worst-first: higher is better.
- Top-k agreement: is a method's most important superpixel among the k most important of a
  reference ranking (LIME with 1000 samples)?

Segments are label images with labels 0..n-1; a method's scores are one value per label
(``explainserve.swag.segment_means`` pools pixel scores into them, as SWAG does).
"""

from __future__ import annotations

import numpy as np
import torch

from explainserve.evaluation.checks import as_numpy, check_batch, check_same_spatial, check_targets

ORDERS = ("best", "worst")


def _label_count(labels: np.ndarray) -> int:
    if labels.min() < 0:
        raise ValueError("segments must hold labels >= 0")
    return int(labels.max()) + 1


@torch.no_grad()
def superpixel_removal(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    segments,
    segment_scores: list,
    order: str = "best",
    *,
    target=None,
    batch_size: int = 64,
) -> np.ndarray:
    """Fraction of superpixels removed when the prediction first changes.

    Parameters
    ----------
    model : classifier returning logits.
    inputs : (B, C, *S) normalised inputs.
    segments : (B, *S) int labels 0..n_b-1.
    segment_scores : B arrays (n_b,) of scores, higher = more important (stable on ties).
    order : "best" removes the highest scores first, "worst" the lowest first.
    target : (B,) class whose change is awaited; default the class predicted on ``inputs``.
    batch_size : perturbed inputs per forward pass.

    Returns
    -------
    (B,) float64 in (0, 1]; 1.0 when removing every superpixel never changes the class.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_batch("inputs", inputs, (4, 5))
    segments = torch.as_tensor(as_numpy(segments, "segments")).long().to(inputs.device)
    check_same_spatial("segments", segments, "inputs", (inputs.shape[0], *inputs.shape[2:]))
    if len(segment_scores) != inputs.shape[0]:
        raise ValueError(f"segment_scores must hold one array per sample ({inputs.shape[0]}), got {len(segment_scores)}")
    if target is None:
        target = model(inputs).argmax(dim=1)
    target = check_targets(target, inputs.shape[0])
    fractions = np.empty(inputs.shape[0])
    for b in range(inputs.shape[0]):
        scores = np.asarray(segment_scores[b], dtype=np.float64)
        count = _label_count(segments[b].cpu().numpy())
        if scores.shape != (count,) or not np.isfinite(scores).all():
            raise ValueError(f"segment_scores[{b}] must be {count} finite values (one per segment label)")
        ranking = np.argsort(-scores if order == "best" else scores, kind="stable")
        # removal_step[label] = how many superpixels are gone once this one is removed.
        removal_step = torch.empty(count, dtype=torch.long, device=inputs.device)
        removal_step[torch.as_tensor(ranking, device=inputs.device)] = torch.arange(1, count + 1, device=inputs.device)
        pixel_step = removal_step[segments[b]]
        fractions[b] = 1.0
        for start in range(1, count + 1, batch_size):
            removed = torch.arange(start, min(start + batch_size, count + 1), device=inputs.device)
            keep = (pixel_step[None] > removed.view(-1, *([1] * pixel_step.ndim))).unsqueeze(1)
            predicted = model(inputs[b : b + 1] * keep.to(inputs.dtype)).argmax(dim=1).cpu()
            changed = (predicted != target[b]).nonzero()
            if len(changed):
                fractions[b] = int(removed[changed[0, 0]]) / count
                break
    return fractions


def top_k_agreement(segment_scores: list, reference_scores: list, k: int) -> np.ndarray:
    """Whether each sample's top-scored segment is among the reference's top ``k`` (ties: lowest label).

    Returns
    -------
    (B,) bool array; its mean is the agreement accuracy.
    """
    if len(segment_scores) != len(reference_scores) or not segment_scores:
        raise ValueError("segment_scores and reference_scores must be non-empty and of the same length")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = np.empty(len(segment_scores), dtype=bool)
    for b, (scores, reference) in enumerate(zip(segment_scores, reference_scores)):
        scores, reference = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
        if scores.shape != reference.shape:
            raise ValueError(f"sample {b}: scores have {scores.shape} segments, reference {reference.shape}")
        hits[b] = np.argmax(scores) in np.argsort(-reference, kind="stable")[:k]
    return hits
