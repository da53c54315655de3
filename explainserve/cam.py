"""Class activation maps from a probe pass.

A CAM is ``relu(sum_k w_k A_k)``; methods differ only in how the channel weights ``w`` are
computed from A and dy/dA. Each weighting is one small function — the single extension point,
as in pytorch-grad-cam's ``get_cam_weights``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

CamWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spatial_dims(activations: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, activations.ndim))


def _broadcast(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return weights.reshape(weights.shape + (1,) * (activations.ndim - 2))


def gradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: w_k = mean over space of dy/dA_k. Shapes (B, K, ...) -> (B, K)."""
    return gradients.mean(dim=_spatial_dims(gradients))


def gradcam_plus_plus_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ with the exponential-output closed form (Chattopadhay et al. 2018, eq. 19).

    alpha = g^2 / (2 g^2 + sum(A) g^3 + eps) where g != 0, w_k = sum over space of alpha * relu(g).
    """
    dims = _spatial_dims(gradients)
    grads_2 = gradients.pow(2)
    grads_3 = grads_2 * gradients
    sum_activations = _broadcast(activations.sum(dim=dims), activations)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return (alpha * gradients.clamp(min=0)).sum(dim=dims)


def xgradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM: w_k = sum(g_k * A_k) / (sum(A_k) + eps)."""
    dims = _spatial_dims(gradients)
    return (gradients * activations).sum(dim=dims) / (activations.sum(dim=dims) + 1e-7)


def class_activation_map(
    activations: torch.Tensor, gradients: torch.Tensor, weights: CamWeights = gradcam_weights
) -> torch.Tensor:
    """Unnormalised CAM at activation resolution: relu(sum_k w_k A_k).

    Parameters
    ----------
    activations, gradients : Tensor, shape (B, K, h, w) or (B, K, t, h, w)
        A and dy/dA at the target layer.
    weights : callable
        Channel weighting, e.g. :func:`gradcam_weights`.

    Returns
    -------
    Tensor, shape (B, h, w) or (B, t, h, w)
    """
    w = _broadcast(weights(activations, gradients), activations)
    return (w * activations).sum(dim=1).clamp(min=0)


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize (B, h, w) or (B, t, h, w) maps (bi/tri)linearly to ``size``, as float32."""
    mode = "bilinear" if maps.ndim == 3 else "trilinear"
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Grad-CAM at input resolution ``size`` ((H, W) or (T, H, W)); unnormalised, float32."""
    return upsample(class_activation_map(activations, gradients, gradcam_weights), size)
