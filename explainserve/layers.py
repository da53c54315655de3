"""Choosing the target layer: one rule for any CNN, from one dry forward pass.

The rule: the target layer is **the last module whose output is a spatial feature map that the
head then pools**. A spatial feature map is a tensor of the input's rank, (B, C, h, w) for
images or (B, C, t, h, w) for video, that is neither the output of a pooling module (VGG's last
max-pool and ``avgpool`` are skipped, so its target is the last ReLU of ``features``, as in the
thesis) nor a summary: a map of one position (a global pool's output, timm VGG's
``pre_logits``, a convolution spanning the whole map, or a last stage the input is too small
for), or anything computed from one (the pooled head: ConvNeXt's LayerNorm2d, MobileNetV3's 1x1
``conv_head`` in timm; a squeeze-and-excitation block inside the trunk is computed from its
input too, so its output stays a map). Modules called more than once (a
shared ``self.relu``) are skipped, since a hook could not tell their calls apart. The choice is
refused when

* token tensors (rank 3, as in a vision transformer) follow the map: the head does not pool it;
* the map is channels-last, (B, t, h, w, C) as in Video Swin: the first linear layer after it
  takes its last dimension, not its dimension 1;
* the logits depend on the input through a path that bypasses the map (two branches merged
  after it): no single layer carries everything the head sees.

A model may name its own target with a ``target_layer`` attribute; ``layer=`` overrides both.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

# Modules whose output is a pooled summary, never the target map.
_POOLING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
# Rule results per model and input shape (C, H, W) or (C, T, H, W).
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Call:
    """One module call of the dry pass, in order of completion."""

    name: str
    module: nn.Module
    output: torch.Tensor
    pooled: bool  # a pooling module's output, or computed from a global pool's output


def _record_calls(model: nn.Module, inputs: torch.Tensor) -> tuple[list[_Call], dict[str, int], torch.Tensor, torch.Tensor]:
    """Run ``model`` once on ``inputs[:1]`` with autograd; return its calls, call counts, input and logits."""
    from .probe import check_logits, eval_mode  # probe imports this module

    calls: list[_Call] = []
    counts: dict[str, int] = {}
    pool_outputs: set[int] = set()  # every pooling module's output
    global_ids: set[int] = set()  # tensors computed from a global pool's output

    def record(name):
        def hook(module, args, output):
            counts[name] = counts.get(name, 0) + 1
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, _POOLING):
                pool_outputs.add(id(output))
            # One position is a summary whatever module made it: a global pool, a convolution
            # spanning the whole map (timm VGG's fully connected pre_logits), or a last stage
            # the input is too small for. A CAM over it is a constant.
            if output.ndim > 2 and output.shape[2:].numel() == 1:
                global_ids.add(id(output))
            if any(isinstance(a, torch.Tensor) and id(a) in global_ids for a in args):
                global_ids.add(id(output))
            calls.append(_Call(name, module, output, id(output) in pool_outputs or id(output) in global_ids))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    x = inputs[:1].detach().clone().requires_grad_(True)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    check_logits(logits, tuple(x.shape))
    return calls, counts, x, logits


def _is_feature_map(call: _Call, rank: int) -> bool:
    return call.output.ndim == rank and not call.pooled


def _bypasses(logits: torch.Tensor, node, x: torch.Tensor) -> bool:
    """True when the autograd graph of ``logits`` reaches ``x`` without passing through ``node``."""
    stack, seen = [logits.grad_fn], set()
    while stack:
        current = stack.pop()
        if current is None or current is node or current in seen:
            continue
        seen.add(current)
        if getattr(current, "variable", None) is x:
            return True
        stack.extend(next_node for next_node, _ in current.next_functions)
    return False


def _is_token(call: _Call, rank: int) -> bool:
    return call.output.ndim not in (2, rank) and not call.pooled  # a pooled (B, C, 1) is no token


def _tokens_refusal(calls: list[_Call], maps: list[int], token: _Call, rank: int) -> str:
    """The message refusing a model whose head reads tokens: ``token`` follows the last map of
    ``calls`` (``maps``: their indices). Where tokens came before that map, it is likely an
    attention internal of the input's rank (a vision transformer's (B, heads, tokens, dim) key
    norm), so the message names the last map before the first tokens, and lists only maps before them."""
    chosen = calls[maps[-1]]
    first = next(i for i, c in enumerate(calls) if _is_token(c, rank))
    before = [i for i in maps if i < first]
    if first > maps[-1] or not before:
        return (f"layer: the head does not pool the last spatial map {chosen.name} {tuple(chosen.output.shape)}: "
                f"{token.name} {tuple(token.output.shape)} follows it (a transformer is not a CNN); "
                f"candidates: {_candidates_text(calls, rank)}; pass layer=<dotted module name>")
    embedded = calls[before[-1]]
    return (f"layer: the head does not pool a spatial map: the first tokens, {calls[first].name} "
            f"{tuple(calls[first].output.shape)}, follow {embedded.name} {tuple(embedded.output.shape)}, and tokens "
            f"follow every later output of rank {rank} (the last: {chosen.name} {tuple(chosen.output.shape)}) (a "
            f"transformer is not a CNN); candidates: {_candidates_text(calls[:first], rank)}; "
            f"pass layer=<dotted module name>")


def _candidates_text(calls: list[_Call], rank: int) -> str:
    maps = [f"{c.name} {tuple(c.output.shape)}" for c in calls if c.output.ndim == rank]
    return ", ".join(maps[-8:]) or "none"


def feature_map_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """Apply the target-layer rule (module docstring) to ``model`` on ``inputs``.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (B, N).
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W)
        A batch the model takes; only its first sample is run (values do not matter).

    Returns
    -------
    str
        Dotted module name of the target layer.

    Raises
    ------
    ValueError
        When the rule cannot decide: the message lists the model's layers with a map of the
        input's rank and their output shapes, and asks for ``layer=``.
    """
    key = tuple(inputs.shape[1:])
    cached = _CHOSEN.get(model, {}).get(key)
    if cached is not None:
        return cached
    rank = inputs.ndim
    calls, counts, x, logits = _record_calls(model, inputs)
    maps = [i for i, c in enumerate(calls) if _is_feature_map(c, rank) and counts[c.name] == 1]
    listed = _candidates_text(calls, rank)
    if not maps:
        raise ValueError(f"layer: no module outputs a spatial feature map of rank {rank} with more than one "
                         f"position before the head pools "
                         f"(layers with rank-{rank} outputs: {listed}); pass layer=<dotted module name>")
    chosen = calls[maps[-1]]
    after = [c for c in calls[maps[-1] + 1:] if not chosen.name.startswith(c.name + ".")]
    tokens = [c for c in after if _is_token(c, rank)]
    if tokens:
        raise ValueError(_tokens_refusal(calls, maps, tokens[0], rank))
    shape = tuple(chosen.output.shape)
    linear = next((c for c in after if isinstance(c.module, nn.Linear)), None)
    if linear is not None and linear.module.in_features == shape[-1] != shape[1]:
        raise ValueError(f"layer: the last spatial map {chosen.name} {shape} is channels-last ({linear.name} takes its "
                         f"last dimension); the maps need (B, C, ...) activations; candidates: {listed}; "
                         f"pass layer=<dotted module name> of a channels-first map")
    if _bypasses(logits, chosen.output.grad_fn, x):
        raise ValueError(f"layer: the logits depend on the input through a path that bypasses the last spatial map "
                         f"{chosen.name} {tuple(chosen.output.shape)}, so no single layer can be chosen; "
                         f"candidates: {listed}; pass layer=<dotted module name>")
    _CHOSEN.setdefault(model, {})[key] = chosen.name
    return chosen.name


def default_target_layer(model: nn.Module, inputs: torch.Tensor | None = None) -> str:
    """Return the dotted name of the default target layer of ``model``.

    The model's ``target_layer`` attribute when it has one (the demo models do), else the
    rule of this module applied on ``inputs``.

    Raises
    ------
    ValueError
        If the rule cannot decide (see :func:`feature_map_layer`), or no inputs are given to apply it.
    """
    named = getattr(model, "target_layer", None)
    if isinstance(named, str):
        return named
    if inputs is None:
        raise ValueError("layer: the target-layer rule needs an input batch to run the model once; pass inputs or layer=")
    return feature_map_layer(model, inputs)


def resolve_layer(model: nn.Module, layer: str | None, inputs: torch.Tensor | None = None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for ``layer``, or for the default target layer when None.

    Raises
    ------
    ValueError
        If ``layer`` names no module of the model (the message lists the accepted names), or
        the default rule cannot decide.
    """
    name = default_target_layer(model, inputs) if layer is None else layer
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        candidates = [n for n, m in model.named_modules() if n and not isinstance(m, (nn.Sequential, nn.ModuleList))]
        shown = ", ".join(candidates[-12:])
        raise ValueError(f"layer: unknown layer name {name!r}; accepted: a dotted module name of the model, e.g. {shown}")
    return name, modules[name]
