"""Independent references for the probe: plain autograd and captum, none of the library's code.

``assert_probe_exact`` checks one model against all of them.
``layer_gradient`` detaches a clone of the target layer's output and feeds a copy of it to the
rest of the network, so dy/dA is taken with respect to a leaf that no later op can alias.
``guided_backprop`` is captum's GuidedBackprop, extended to ReLU6 modules (captum hooks
``nn.ReLU`` only) with the same rule, ``grad_in = relu(grad_in)``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torchvision
from captum.attr import GuidedBackprop
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from explainserve.cam import class_activation_map
from explainserve.probe import probe


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
        if isinstance(model, torchvision.models.DenseNet):  # not timm's, whose features end with their ReLU
            pooled = nn.functional.adaptive_avg_pool2d(self.relu(model.features(x)), 1)
            return model.classifier(torch.flatten(pooled, 1))
        return model(x)


def pytorch_grad_cam_map(model: nn.Module, layer: str, inputs: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's unnormalised Grad-CAM at ``layer``, from its own activation and gradient hooks
    (its ReLU applied as its ``compute_cam_per_layer`` does, before any resizing or scaling)."""
    module = dict(model.named_modules())[layer]
    with GradCAM(model=model, target_layers=[module]) as cam:
        cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(c)) for c in target])
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(inputs, module, None, activations, gradients, eigen_smooth=False), 0)


def reference_copy(model: nn.Module) -> nn.Module:
    """A copy without in-place ops, whose functional ReLUs captum can hook; ``model.`` prefixes its names.

    pytorch-grad-cam keeps a view of the layer's output, which DenseNet's in-place ReLU later
    rewrites (its CAM would then weight relu(A)); on this copy it keeps A itself.
    """
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return ModuleReLUs(twin).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def assert_probe_exact(model: nn.Module, inputs: torch.Tensor, expected_layer: str, *, rectifiers: bool) -> None:
    """Check one probe pass of ``model`` on ``inputs`` against the references.

    * the default target layer is ``expected_layer``;
    * A and dy/dA equal :func:`layer_gradient`'s;
    * the Grad-CAM map equals pytorch-grad-cam's at the same layer, from its own hooks;
    * the guided input gradient equals :func:`guided_backprop`'s; with ``rectifiers`` (ReLU or
      ReLU6 networks) it differs from the vanilla gradient, so that comparison can fail;
      without, the pixel scores and the Grad-CAM sum before its ReLU are finite and not constant.
    """
    result = probe(model, inputs, vanilla_gradient=True)
    assert result.layer == expected_layer

    activations, gradients = layer_gradient(model, inputs, result.layer, result.target)
    assert torch.equal(result.activations, activations)
    assert relative_error(result.activation_gradients, gradients) < 1e-4

    twin = reference_copy(model)
    theirs = pytorch_grad_cam_map(twin, f"model.{result.layer}", inputs, result.target)
    ours = class_activation_map(result.activations, result.activation_gradients).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * max(np.abs(theirs).max(), 1e-6))

    expected = guided_backprop(twin, inputs, result.target)
    assert relative_error(result.input_gradient, expected) < 1e-4
    if rectifiers:
        assert relative_error(result.vanilla_gradient, expected) > 1e-2, "the guided rule was not applied"
        return
    pixel_scores = result.input_gradient.abs().amax(dim=1)
    weights = result.activation_gradients.mean(dim=tuple(range(2, result.activations.ndim)), keepdim=True)
    for name, values in (("pixel scores", pixel_scores), ("Grad-CAM before its ReLU", (weights * result.activations).sum(dim=1))):
        assert torch.isfinite(values).all(), name
        assert values.flatten(1).std(dim=1).min() > 0, f"{name} are constant"
