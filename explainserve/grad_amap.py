"""Grad-AMap filter scores (thesis eq. 6.6)."""

from __future__ import annotations

import torch


def grad_amap(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Signed importance of each filter for the backpropagated class.

    alpha_k = (1/Z) sum_ij (dy_c/dA_kij) * A_kij, with Z the number of spatial positions.

    Parameters
    ----------
    activations, gradients : Tensor, shape (B, K, h, w) or (B, K, t, h, w)

    Returns
    -------
    Tensor, shape (B, K), float32
    """
    if activations.shape != gradients.shape:
        raise ValueError(f"gradients: shape {tuple(gradients.shape)} differs from activations {tuple(activations.shape)}")
    return (activations * gradients).flatten(2).mean(dim=2).float()
