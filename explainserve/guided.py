"""Guided-ReLU backpropagation that works for every way a network can call a ReLU.

Module hooks (captum's approach) only see ``nn.ReLU`` modules. Networks also call
``F.relu`` (DenseNet), ``torch.relu``, ``Tensor.relu_`` and in-place variants, and reuse one
ReLU module several times (ResNet's ``self.relu``). A :class:`torch.overrides.TorchFunctionMode`
intercepts all of these at the function level while it is active, so one mechanism covers them.

The backward rule is read when the backward pass *runs*, not when the graph is built, so one
forward pass can be backpropagated twice: once guided, once vanilla. Rectifiers after the target
layer (VGG's classifier, DenseNet's ``F.relu`` after ``features``) are intercepted too and
counted, so the probe knows when the head must be backpropagated both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass
class GuidedState:
    """Shared switches of one probe pass.

    Attributes
    ----------
    guided : bool
        Read at backward time: True applies ``grad * (x > 0) * (grad > 0)``,
        False the ordinary ReLU gradient ``grad * (x > 0)``.
    after_target : bool
        Set by the probe once the target layer has run.
    rectifiers_after_target : int
        How many rectifier calls were intercepted after the target layer (0 for ResNets, 2 for
        VGG's classifier): when non-zero, dy/dA (vanilla) and the guided input gradient need
        two backward passes through the head.
    """

    guided: bool = True
    after_target: bool = False
    rectifiers_after_target: int = 0


class _RectifierFunction(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU6-style clip whose backward follows :class:`GuidedState`."""

    @staticmethod
    def forward(ctx, x, upper, inplace, state):
        out = x.clamp_(0, upper) if inplace else x.clamp(0, upper)
        if inplace:
            ctx.mark_dirty(x)
        # The output carries the mask: out > 0 exactly where x > 0.
        ctx.save_for_backward(out)
        ctx.upper = upper
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # aten's own ReLU / hardtanh backward kernels (what nn.ReLU and captum's hooked ReLUs
        # run): grad where 0 < out (< upper), in one pass; a boolean mask multiplied in costs
        # several times more.
        if ctx.upper is None:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        else:
            grad = torch.ops.aten.hardtanh_backward(grad, out, 0.0, float(ctx.upper))
        if ctx.state.guided:
            grad = grad.clamp_(min=0)
        return grad, None, None, None


_OUT_OF_PLACE = {F.relu, torch.relu, torch.Tensor.relu}
_IN_PLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}


class GuidedReLUMode(TorchFunctionMode):
    """Replace every ReLU call with :class:`_RectifierFunction` while the mode is active.

    ``F.hardtanh(x, 0, upper)`` (what ``nn.ReLU6`` calls) and ``F.relu6`` are treated as clipped ReLUs.
    Other activations (SiLU, GELU, Hardswish) are not rectifiers and backpropagate normally.
    The functional forms (``F.relu``, ``F.relu6``, ``F.hardtanh``) hand the mode their tensor
    alone in ``args`` and every other argument as a keyword, whichever way they were called;
    ``torch.relu`` and ``Tensor.relu`` take no other argument.
    """

    def __init__(self, state: GuidedState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            x = args[0]
            if func in _OUT_OF_PLACE or func in _IN_PLACE:
                return self._rectify(x, None, func in _IN_PLACE or kwargs.get("inplace", False))
            if func is F.hardtanh and kwargs["min_val"] == 0.0:
                return self._rectify(x, float(kwargs["max_val"]), kwargs["inplace"])
            if func is F.relu6:
                # F.relu6 reaches the mode itself, not as the F.hardtanh it calls inside.
                return self._rectify(x, 6.0, kwargs["inplace"])
        return func(*args, **kwargs)

    def _rectify(self, x: torch.Tensor, upper: float | None, inplace: bool) -> torch.Tensor:
        self.state.rectifiers_after_target += self.state.after_target
        return _RectifierFunction.apply(x, upper, inplace, self.state)
