"""Per-sample filter scores compared in the filter-removal experiment (thesis 6.2.1, Table 6.1).

All scores come from the target layer's activations A (B, K, *s) and gradients there, with
higher meaning "more important". Grad-CAM++ and XGrad-CAM weights are taken from the
``grad-cam`` package so that the baselines are the peers' own formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAMPlusPlus, XGradCAM

RANKINGS = ("grad_amap", "grad_cam", "grad_cam_pp", "xgrad_cam", "l1_norm", "taylor", "taylor_class", "random")


@dataclass(frozen=True)
class LayerSignals:
    """Activations and gradients at one layer for a batch.

    Attributes
    ----------
    activations : (B, K, *s) layer output A.
    class_gradients : (B, K, *s) d y_c / dA, y_c the logit of the given class.
    loss_gradients : (B, K, *s) d L / dA, L the cross-entropy against the given class.
    """

    activations: torch.Tensor
    class_gradients: torch.Tensor
    loss_gradients: torch.Tensor


def layer_signals(model: torch.nn.Module, layer: torch.nn.Module, inputs: torch.Tensor, classes) -> LayerSignals:
    """One forward pass and two backward passes (class logit, cross-entropy) to ``layer``.

    Samples are independent (eval mode), so summing over the batch gives per-sample gradients.
    """
    captured = {}

    def hook(_module, _inputs, output):
        # A fresh leaf: the backward passes stop at the layer instead of reaching the input.
        captured["A"] = output.detach().requires_grad_()
        return captured["A"]

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    classes = torch.as_tensor(classes, device=logits.device).long().view(-1)
    activations = captured["A"]
    class_score = logits.gather(1, classes.view(-1, 1)).sum()
    (class_gradients,) = torch.autograd.grad(class_score, activations, retain_graph=True)
    (loss_gradients,) = torch.autograd.grad(F.cross_entropy(logits, classes, reduction="sum"), activations)
    return LayerSignals(activations.detach(), class_gradients.detach(), loss_gradients.detach())


def filter_scores(signals: LayerSignals, ranking: str, *, seed: int = 0) -> torch.Tensor:
    """Scores (B, K) float32 of one ranking; see ``RANKINGS``.

    - grad_amap: mean(dy_c/dA * A) (eq. 6.6), signed;
    - grad_cam: mean(dy_c/dA), the Grad-CAM channel weight;
    - grad_cam_pp, xgrad_cam: the channel weights of ``grad-cam``'s GradCAMPlusPlus / XGradCAM;
    - l1_norm: sum |A| (eq. 6.5);
    - taylor: |mean(dL/dA * A)| with L the cross-entropy loss (eq. 6.4);
    - taylor_class: |mean(dy_c/dA * A)|;
    - random: uniform noise from ``seed``.
    """
    A, G = signals.activations, signals.class_gradients
    spatial = tuple(range(2, A.ndim))
    if ranking == "grad_amap":
        scores = (G * A).mean(dim=spatial)
    elif ranking == "grad_cam":
        scores = G.mean(dim=spatial)
    elif ranking in ("grad_cam_pp", "xgrad_cam"):
        peer = GradCAMPlusPlus if ranking == "grad_cam_pp" else XGradCAM
        # get_cam_weights reads only its activations and gradients, never the instance.
        weights = peer.get_cam_weights(None, None, None, None, A.cpu().numpy(), G.cpu().numpy())
        scores = torch.from_numpy(np.asarray(weights))
    elif ranking == "l1_norm":
        scores = A.abs().sum(dim=spatial)
    elif ranking == "taylor":
        scores = (signals.loss_gradients * A).mean(dim=spatial).abs()
    elif ranking == "taylor_class":
        scores = (G * A).mean(dim=spatial).abs()
    elif ranking == "random":
        scores = torch.rand(A.shape[:2], generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    return scores.float().cpu()
