"""Deletion and insertion curves (RISE; thesis 3.5.1 and 4.5.2.1).

Pixels (or voxels, for clips) are ranked by the explanation, highest first. Deletion sets
them to 0 in normalised input space (the dataset mean) in steps of P / ``n_steps`` positions,
starting from the input; insertion copies them from the input into an all-zero input. At
every step the softmax of the class predicted on the unperturbed input is recorded.
Deletion AUC: lower is better. Insertion AUC: higher is better.
"""

from __future__ import annotations

import math

import torch

from explainserve.evaluation.checks import check_batch, check_finite, check_same_spatial, check_targets

MODES = ("deletion", "insertion")


def curve_auc(curve) -> torch.Tensor:
    """Area under curves sampled at evenly spaced points, on a [0, 1] x-axis.

    AUC = (sum(a) - a_0 / 2 - a_n / 2) / (n - 1), the trapezoidal rule.

    Parameters
    ----------
    curve : tensor or array (..., n), n >= 2 finite values.

    Returns
    -------
    tensor (...,) float64.
    """
    curve = torch.as_tensor(curve, dtype=torch.float64)
    if curve.ndim == 0 or curve.shape[-1] < 2:
        raise ValueError(f"curve needs at least 2 points along its last axis, got shape {tuple(curve.shape)}")
    if not torch.isfinite(curve).all():
        raise ValueError("curve holds NaN or inf values; refusing to integrate it")
    n = curve.shape[-1]
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (n - 1)


def removal_order(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every position by explanation value, 0 = most important.

    Ties keep raster order (stable sort), so a constant map removes pixels row by row.

    Parameters
    ----------
    maps : (B, *S) float tensor.

    Returns
    -------
    (B, *S) long tensor of ranks in [0, prod(S)).
    """
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1]).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks.reshape(maps.shape)


@torch.no_grad()
def perturbation_curves(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    maps,
    mode: str = "deletion",
    *,
    n_steps: int = 28,
    target=None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Softmax of the original prediction as pixels are deleted from / inserted into the input.

    Parameters
    ----------
    model : classifier returning logits (B, N).
    inputs : (B, C, H, W) or (B, C, T, H, W) float tensor, normalised.
    maps : (B, H, W) or (B, T, H, W) explanation, one value per position.
    mode : "deletion" or "insertion".
    n_steps : number of steps; each step moves ceil(P / n_steps) positions (P = H*W[*T]).
    target : optional (B,) classes to record; default: the class predicted on ``inputs``.
    batch_size : perturbed inputs per forward pass.

    Returns
    -------
    (B, n_steps + 1) float64 tensor of probabilities; column 0 is before any change.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_batch("inputs", inputs, (4, 5))
    maps = torch.as_tensor(maps)
    check_same_spatial("maps", maps, "inputs", (inputs.shape[0], *inputs.shape[2:]))
    check_finite("maps", maps)
    positions = math.prod(inputs.shape[2:])
    if not 1 <= n_steps <= positions:
        raise ValueError(f"n_steps must lie in [1, {positions}] (the number of positions), got {n_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = math.ceil(positions / n_steps)
    ranks = removal_order(maps.to(inputs.device))
    if target is None:
        target = model(inputs).argmax(dim=1)
    target = check_targets(target, inputs.shape[0]).to(inputs.device)

    counts = torch.arange(n_steps + 1, device=inputs.device) * step
    curves = torch.empty(inputs.shape[0], n_steps + 1, dtype=torch.float64)
    jobs = [(b, k) for b in range(inputs.shape[0]) for k in range(n_steps + 1)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        b_index = torch.tensor([b for b, _ in chunk], device=inputs.device)
        k_index = torch.tensor([k for _, k in chunk], device=inputs.device)
        moved = ranks[b_index] < counts[k_index].view(-1, *([1] * (ranks.ndim - 1)))
        keep = ~moved if mode == "deletion" else moved
        batch = inputs[b_index] * keep.unsqueeze(1).to(inputs.dtype)
        probabilities = torch.softmax(model(batch).double(), dim=1)
        curves[b_index.cpu(), k_index.cpu()] = probabilities.gather(1, target[b_index].view(-1, 1)).squeeze(1).cpu()
    return curves


def deletion_auc(model, inputs, maps, **kwargs) -> torch.Tensor:
    """Per-sample deletion AUC (B,) float64; lower is better. See :func:`perturbation_curves`."""
    return curve_auc(perturbation_curves(model, inputs, maps, "deletion", **kwargs))


def insertion_auc(model, inputs, maps, **kwargs) -> torch.Tensor:
    """Per-sample insertion AUC (B,) float64; higher is better. See :func:`perturbation_curves`."""
    return curve_auc(perturbation_curves(model, inputs, maps, "insertion", **kwargs))
