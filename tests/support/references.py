"""Independent references for the probe: plain autograd and captum, none of the library's code.

``layer_gradient`` detaches a clone of the target layer's output and feeds a copy of it to the
rest of the network, so dy/dA is taken with respect to a leaf that no later op can alias.
``guided_backprop`` is captum's GuidedBackprop, extended to ReLU6 modules (captum hooks
``nn.ReLU`` only) with the same rule, ``grad_in = relu(grad_in)``.
"""

from __future__ import annotations

import warnings

import torch
from captum.attr import GuidedBackprop
from torch import nn


def layer_gradient(model: nn.Module, inputs: torch.Tensor, layer: str, target: torch.Tensor):
    """Return ``(A, dy/dA)`` of ``layer`` for class ``target[i]`` of sample i, by plain autograd."""
    module = dict(model.named_modules())[layer]
    box = {}

    def detach(_module, _args, output):
        box["A"] = output.detach().clone().requires_grad_(True)
        return box["A"].clone()

    handle = module.register_forward_hook(detach)
    try:
        with torch.enable_grad():
            logits = model.eval()(inputs)
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(inputs)), target].sum(), box["A"])
    return box["A"].detach(), gradient


class _ReLU6Guided(nn.Module):
    """Applies captum's guided rule to a ReLU6 module's input gradient."""

    @staticmethod
    def hook(_module, grad_input, _grad_output):
        return tuple(None if g is None else g.clamp(min=0) for g in grad_input)


def guided_backprop(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """captum GuidedBackprop of ``model`` for class ``target[i]`` of sample i (ReLU6 guided too)."""
    handles = [m.register_full_backward_hook(_ReLU6Guided.hook) for m in model.modules() if isinstance(m, nn.ReLU6)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GuidedBackprop(model.eval()).attribute(inputs, target=target)
    finally:
        for handle in handles:
            handle.remove()


class ModuleReLUs(nn.Module):
    """A torchvision model whose functional ReLUs become ``nn.ReLU`` modules, so captum sees them.

    DenseNet applies ``F.relu`` after ``features``; Inception v3's and GoogLeNet's BasicConv2d
    apply it after every convolution. The weights are shared with ``model``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.relu = nn.ReLU()
        for module in model.modules():
            if type(module).__name__ == "BasicConv2d":
                module.relu = nn.ReLU()
                module.forward = lambda x, m=module: m.relu(m.bn(m.conv(x)))

    def forward(self, x):
        model = self.model
        if hasattr(model, "features") and type(model).__name__ == "DenseNet":
            pooled = nn.functional.adaptive_avg_pool2d(self.relu(model.features(x)), 1)
            return model.classifier(torch.flatten(pooled, 1))
        return model(x)
