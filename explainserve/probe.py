"""The probe pass: one forward and one guided backward feed every explanation.

From one forward pass and one ``torch.autograd.grad`` call on the target logits we get

* the guided-backprop input gradient (SWAG's pixel scores),
* the activation A of the target layer and dy_c/dA (Grad-CAM, Jitter-CAM, Grad-AMap),

and the forward pass gives the prediction. ``autograd.grad`` with respect to the input and A
only, instead of ``.backward()``, skips every parameter gradient.

Both gradients are exact for any head. Guided backprop applies its rule at every ReLU, those
after the target layer included, while dy_c/dA must be the vanilla gradient. When the head has
rectifiers (VGG's classifier) it is backpropagated twice: vanilla to A, then guided to the
input; the head is cheap next to the trunk. Layers after the target see a copy of A, so an
in-place op there (DenseNet's ``F.relu(features, inplace=True)``) cannot turn dy/dA into
dy/d(relu(A)).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .guided import GuidedReLUMode, GuidedState
from .layers import resolve_layer


@dataclass
class ProbeResult:
    """Everything one probe pass yields, detached from the graph.

    Attributes
    ----------
    logits : Tensor, shape (B, N)
        Pre-softmax class scores.
    probabilities : Tensor, shape (B, N)
        Softmax of ``logits`` (a property: computed when read, from ``logits``).
    predicted : LongTensor, shape (B,)
        Arg-max class per sample.
    target : LongTensor, shape (B,)
        The class whose logit was backpropagated (``predicted`` unless given).
    input_gradient : Tensor or None, shape of the input
        Guided-backprop gradient of the target logit with respect to the input.
    vanilla_gradient : Tensor or None, shape of the input
        Plain gradient of the target logit, from a second backward on the same graph.
    activations : Tensor, shape (B, K, h, w) or (B, K, t, h, w)
        Output A of the target layer.
    activation_gradients : Tensor, same shape as ``activations``
        dy_target / dA.
    extra_activation_gradients : Tensor or None, same shape as ``activations``
        dy_extra / dA for ``extra_targets``.
    filter_gradient : Tensor or None, shape of the input
        Plain input gradient of the target logit backpropagated through one filter per
        sample (``filters``): dy_target/dA with every other channel zeroed, then pushed to
        the input with vanilla (unguided) gradients.
    filters : LongTensor or None, shape (B,)
        The filter per sample that ``filter_gradient`` kept.
    layer : str
        Dotted name of the target layer.
    """

    logits: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor
    input_gradient: torch.Tensor | None
    vanilla_gradient: torch.Tensor | None
    activations: torch.Tensor
    activation_gradients: torch.Tensor
    extra_activation_gradients: torch.Tensor | None
    layer: str
    filter_gradient: torch.Tensor | None = None
    filters: torch.Tensor | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return class_scores(self.logits)

    def top_k(self, k: int, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores, classes)``, each (B, k): the k highest logits' classes per sample,
        scored as :func:`class_scores` does (softmax, or each logit's sigmoid if ``multi_label``).
        Ranked by logit, not by score: float32 scores tie where they saturate (sigmoids at 1.0,
        softmax probabilities at 0) while the logits still differ."""
        k = min(int(k), self.logits.shape[1])
        if k < 1:
            raise ValueError(f"top_k: must be >= 1, got {k}")
        classes = self.logits.topk(k, dim=1).indices
        return class_scores(self.logits, multi_label).gather(1, classes), classes


def class_scores(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """The (B, N) class scores of (B, N) ``logits``: their softmax over the classes, or, for a
    multi-label classifier (N independent sigmoid outputs, trained with ``BCEWithLogitsLoss``),
    each logit's own sigmoid, since a softmax would make its labels compete. Both keep the
    logits' order, so the predicted class is the arg-max logit either way."""
    return logits.sigmoid() if multi_label else logits.softmax(dim=1)


def check_inputs(inputs: torch.Tensor, model: nn.Module) -> None:
    """Raise ValueError unless ``inputs`` is a finite float batch the model can take."""
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs: expected a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim not in (4, 5):
        raise ValueError(
            f"inputs: expected rank 4 (B, C, H, W) or rank 5 (B, C, T, H, W), got rank {inputs.ndim} with shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise ValueError(f"inputs: expected a floating-point tensor, got {inputs.dtype}")
    if inputs.shape[0] < 1:
        raise ValueError("inputs: the batch is empty; expected at least 1 sample")
    expected = expected_channels(model)
    if expected is not None and inputs.shape[1] != expected:
        raise ValueError(f"inputs: expected {expected} channels (dimension 1), got {inputs.shape[1]}")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs: contains NaN or Inf values; expected finite values")


def one_logit_per_sample(logits, batch: int) -> bool:
    """True when ``logits`` holds one value per sample of a batch of ``batch``: (B, 1), or (B,) and
    () as a forward ending in ``squeeze`` returns them (a sigmoid binary classifier)."""
    return (isinstance(logits, torch.Tensor) and logits.ndim <= 2 and logits.numel() == batch
            and (logits.ndim < 2 or logits.shape[1] == 1))


def check_logits(logits, input_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``logits`` is a (B, N) tensor with N >= 2 for inputs of ``input_shape``
    (B, ...), naming what the model returned and the fix."""
    if one_logit_per_sample(logits, input_shape[0]):
        # Softmax over one logit is 1 whatever the input: every answer would be class 0, certain.
        raise ValueError(f"model: returns one logit per sample (a sigmoid binary classifier?) for an input of shape "
                         f"{input_shape}; explainserve serves one logit per class: return two, e.g. "
                         f"torch.cat([-z / 2, z / 2], dim=1), whose softmax is the sigmoid's (1 - p, p), as "
                         f"explainserve.models.served_as_two_classes(model) does (explainserve archive does it itself)")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != input_shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        fix = "; return the logits alone (a forward that returns them, e.g. out[0] or out['logits'])" \
            if isinstance(logits, (tuple, list, dict)) else ""
        raise ValueError(f"model: returns {shape} for an input of shape {input_shape}; "
                         f"explainserve serves classifiers returning logits of shape (B, num_classes){fix}")


def input_size_failure(error: RuntimeError, input_shape: tuple[int, ...], argument: str) -> ValueError:
    """The ValueError for a model whose forward pass failed with ``error`` on an input of shape
    ``input_shape`` (a fixed pooling window larger than the map, a Linear sized for another
    input): it starts with ``argument`` (the setting that chose the size) and gives the model's own
    first line of complaint."""
    lines = str(error).strip().splitlines()
    return ValueError(f"{argument}: the model cannot run on an input of shape {input_shape} "
                      f"({type(error).__name__}: {lines[0] if lines else 'no message'}); "
                      f"pass the input size it was trained at")


def expected_channels(model: nn.Module) -> int | None:
    """In-channels of the model's first convolution, or None if it has none."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return module.in_channels
    return None


def _as_class_tensor(classes, batch: int, n_classes: int, name: str, fallback: torch.Tensor) -> torch.Tensor:
    """Class id per sample; None entries take the ``fallback`` class of that sample."""
    if isinstance(classes, (list, tuple)) and any(c is None for c in classes):
        if len(classes) != batch:
            raise ValueError(f"{name}: expected one class per sample ({batch}), got {len(classes)}")
        classes = [int(f) if c is None else c for c, f in zip(classes, fallback.tolist())]
    tensor = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if tensor.numel() == 1 and batch > 1:
        tensor = tensor.expand(batch)
    if tensor.numel() != batch:
        raise ValueError(f"{name}: expected one class per sample ({batch}), got {tensor.numel()}")
    if (tensor < 0).any() or (tensor >= n_classes).any():
        raise ValueError(f"{name}: class ids must be in [0, {n_classes - 1}], got {tensor.tolist()}")
    return tensor


def _as_filter_tensor(filters, batch: int, n_filters: int, layer_name: str) -> torch.Tensor:
    """Filter id per sample, checked against the target layer's channel count."""
    if isinstance(filters, bool) or (isinstance(filters, torch.Tensor) and filters.is_floating_point()):
        raise ValueError(f"filters: expected integer filter ids, got {filters!r}")
    values = filters.tolist() if isinstance(filters, torch.Tensor) else filters
    values = [values] if not isinstance(values, (list, tuple)) else list(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"filters: expected integer filter ids, got {values!r}")
    if len(values) == 1 and batch > 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"filters: expected one filter per sample ({batch}), got {len(values)}")
    if any(not 0 <= v < n_filters for v in values):
        raise ValueError(
            f"filters: filter ids must be in [0, {n_filters - 1}] (layer {layer_name!r} has {n_filters} filters), got {values}"
        )
    return torch.tensor(values, dtype=torch.long)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Turn ``requires_grad`` off on every parameter (no pass needs their gradients), then
    restore each one's own flag."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def probe(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    layer: str | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    input_gradient: bool = True,
    vanilla_gradient: bool = False,
    extra_targets: Sequence[int] | torch.Tensor | None = None,
    filters: int | Sequence[int] | torch.Tensor | None = None,
) -> ProbeResult:
    """Run one forward and one backward pass and return what every explanation needs.

    Parameters
    ----------
    model : nn.Module
        An image (B, C, H, W) or video (B, C, T, H, W) classifier returning logits (B, N).
        It is run in eval mode; its training flags, parameters and hooks are left as found.
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W)
        Normalised input batch.
    layer : str, optional
        Dotted name of the target layer; the architecture's last conv block by default
        (see :func:`explainserve.layers.default_target_layer`).
    target : int or sequence of (int or None), optional
        Class per sample to explain; the predicted class by default (and for None entries).
    input_gradient : bool
        Compute the guided input gradient. Without it, only dy/dA is computed and the
        network before the target layer runs without autograd (cheaper; used by Jitter-CAM
        and Grad-AMap-only passes).
    vanilla_gradient : bool
        Also compute the plain input gradient (a second backward on the same graph).
    extra_targets : sequence of int, optional
        A second class per sample whose dy/dA is wanted too (e.g. a ground-truth label for
        Grad-AMap scoring); None entries take the target class. Costs a backward through the layers after the target layer only.
    filters : int or sequence of int, optional
        A target-layer filter (channel) per sample. Adds ``filter_gradient``: dy_target/dA
        with every other filter's gradient zeroed, backpropagated to the input with vanilla
        gradients (thesis 6.3.2). Costs a backward through the layers before the target layer.

    Returns
    -------
    ProbeResult

    Raises
    ------
    ValueError
        On a wrong rank, channel count, NaN/Inf input, out-of-range class or filter, or unknown layer.
    """
    # Whatever the caller's mode, the passes below are autograd. (A `with` rather than the
    # decorator: a decorated function is one mutmut leaves unmutated.)
    with torch.enable_grad():
        check_inputs(inputs, model)
        layer_name, module = resolve_layer(model, layer, inputs)
        state = GuidedState()
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, _args, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer: {layer_name!r} returns {type(output).__name__}; a tensor output is required")
            if not keep_trunk:
                # Nothing before A needs a gradient: the graph starts at A.
                output = output.detach().requires_grad_(True)
            captured["A"] = output
            state.after_target = True
            # Later layers get a copy, so their in-place ops leave A (and dy/dA) alone; the copy is
            # recorded even where the model runs the layer under its own no_grad.
            with torch.enable_grad():
                return output.clone()

        keep_trunk = input_gradient or vanilla_gradient or filters is not None
        x = inputs.detach().clone().requires_grad_(keep_trunk)
        handle = module.register_forward_hook(capture)
        try:
            guided_relus = GuidedReLUMode(state) if input_gradient else contextlib.nullcontext()
            # No parameter tracked: the graph holds only what depends on x (when the trunk is kept)
            # or on A, and grad mode is never switched inside the model's forward.
            with eval_mode(model), frozen_parameters(model), guided_relus:
                logits = model(x)
        finally:
            handle.remove()
        if "A" not in captured:
            raise ValueError(f"layer: {layer_name!r} was not executed by the forward pass")
        check_logits(logits, tuple(inputs.shape))

        batch, n_classes = logits.shape
        predicted = logits.detach().argmax(dim=1)
        # Ids built from Python values start on the CPU; index on the device the model ran on.
        target_ids = predicted if target is None else _as_class_tensor(target, batch, n_classes, "target",
                                                                          predicted).to(logits.device)
        rows = torch.arange(batch, device=logits.device)
        score = logits[rows, target_ids].sum()
        activations = captured["A"]

        filter_ids = (None if filters is None else
                      _as_filter_tensor(filters, batch, activations.shape[1], layer_name).to(activations.device))
        # Later backward passes reuse the graph; the last one may free it.
        later = [vanilla_gradient, extra_targets is not None, filter_ids is not None]
        guided_gradient = None
        if input_gradient and not state.rectifiers_after_target:
            guided_gradient, activation_gradients = torch.autograd.grad(score, [x, activations],
                                                                        retain_graph=any(later))
        else:
            state.guided = False
            (activation_gradients,) = torch.autograd.grad(score, [activations],
                                                          retain_graph=input_gradient or any(later))
            if input_gradient:
                state.guided = True
                (guided_gradient,) = torch.autograd.grad(score, [x], retain_graph=any(later))
        # Every later gradient is a vanilla one.
        state.guided = False
        vanilla = None
        if vanilla_gradient:
            (vanilla,) = torch.autograd.grad(score, [x], retain_graph=any(later[1:]))
        extra = None
        if extra_targets is not None:
            extra_ids = _as_class_tensor(extra_targets, batch, n_classes, "extra_targets", target_ids).to(logits.device)
            (extra,) = torch.autograd.grad(logits[rows, extra_ids].sum(), [activations], retain_graph=any(later[2:]))
        filter_gradient = None
        if filter_ids is not None:
            only_filter = torch.zeros_like(activation_gradients)
            only_filter[rows, filter_ids] = activation_gradients[rows, filter_ids]
            (filter_gradient,) = torch.autograd.grad(activations, [x], grad_outputs=only_filter)

        return ProbeResult(
            logits=logits.detach(),
            predicted=predicted,
            target=target_ids,
            input_gradient=guided_gradient,
            vanilla_gradient=vanilla,
            activations=activations.detach(),
            activation_gradients=activation_gradients,
            extra_activation_gradients=extra,
            layer=layer_name,
            filter_gradient=filter_gradient,
            filters=filter_ids,
        )
