"""Choosing the target layer: the last convolutional block, whose activation A feeds the CAMs."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models import video as tvv

# Architectures whose last conv block is a named child. Each entry maps a class to a
# function returning the dotted module name.
_KNOWN_LAYERS = (
    (tvm.ResNet, lambda m: "layer4"),
    (tvv.VideoResNet, lambda m: "layer4"),
    # VGG16's features[29]: the ReLU after the last convolution, before the last max-pool.
    (tvm.VGG, lambda m: _last_of_type(m, nn.ReLU, prefix="features")),
    (tvm.DenseNet, lambda m: "features"),
    (tvm.MobileNetV2, lambda m: "features"),
    (tvm.MobileNetV3, lambda m: "features"),
    (tvm.EfficientNet, lambda m: "features"),
    (tvm.ConvNeXt, lambda m: "features"),
)


def _last_of_type(model: nn.Module, kind: type, prefix: str) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, kind) and name.startswith(prefix + ".")]
    return names[-1]


def default_target_layer(model: nn.Module) -> str:
    """Return the dotted name of the default target layer of ``model``.

    Known torchvision architectures map to their last conv block (ResNet and video ResNet
    ``layer4``, VGG's last ReLU in ``features``, ``features`` for DenseNet, MobileNetV2/V3,
    EfficientNet and ConvNeXt). A model may name its own with a ``target_layer`` attribute.
    Otherwise the last ``Conv2d``/``Conv3d`` module is used.

    Raises
    ------
    ValueError
        If the model has no convolution at all.
    """
    for kind, choose in _KNOWN_LAYERS:
        if isinstance(model, kind):
            return choose(model)
    named = getattr(model, "target_layer", None)
    if isinstance(named, str):
        return named
    convolutions = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Conv3d))]
    if not convolutions:
        raise ValueError("layer: the model has no Conv2d/Conv3d module; pass layer=<dotted module name>")
    return convolutions[-1]


def resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for ``layer``, or for the default target layer when None.

    Raises
    ------
    ValueError
        If ``layer`` names no module of the model; the message lists the accepted names.
    """
    name = default_target_layer(model) if layer is None else layer
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        candidates = [n for n, m in model.named_modules() if n and not isinstance(m, (nn.Sequential, nn.ModuleList))]
        shown = ", ".join(candidates[-12:])
        raise ValueError(f"layer: unknown layer name {name!r}; accepted: a dotted module name of the model, e.g. {shown}")
    return name, modules[name]
