"""Filter removal (thesis 6.2.2): how fast does accuracy fall as top-ranked filters are zeroed?

Channels of the target layer's output are zeroed in the order of a per-sample filter ranking,
``step`` (16) at a time, and the accuracy after each step is normalised by the accuracy with
no filter removed. The AUC of accuracy against the fraction of filters removed is low for a
ranking that finds the filters the prediction depends on.
"""

from __future__ import annotations

import contextlib

import torch

from explainserve.evaluation.checks import check_batch, check_finite, check_targets


@contextlib.contextmanager
def channel_gate(layer: torch.nn.Module, keep: torch.Tensor):
    """Multiply ``layer``'s output by ``keep`` (B, K) broadcast over space while active."""

    def hook(_module, _inputs, output):
        return output * keep.view(*keep.shape, *([1] * (output.ndim - 2))).to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def filter_removal_correct(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    inputs: torch.Tensor,
    labels,
    scores,
    *,
    step: int = 16,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples stay correct as their highest-scored filters are removed, ``step`` at a time.

    Parameters
    ----------
    model : classifier returning logits (B, N).
    layer : the module whose output channels are the filters (e.g. ResNet ``layer4``).
    inputs : (B, C, H, W) or (B, C, T, H, W) normalised inputs.
    labels : (B,) ground-truth classes.
    scores : (B, K) filter scores per sample; higher is removed first (stable on ties).
    step : filters removed per step, >= 1.
    batch_size : samples per forward pass.

    Returns
    -------
    fractions : (n,) float64 fraction of filters removed, 0 to 1, n = ceil(K / step) + 1.
    correct : (B, n) bool, sample b classified as its label after step i (per sample, so that
        the curve can be resampled over samples).
    """
    check_batch("inputs", inputs, (4, 5))
    scores = torch.as_tensor(scores)
    if scores.ndim != 2 or scores.shape[0] != inputs.shape[0]:
        raise ValueError(f"scores must have shape (B={inputs.shape[0]}, K), got {tuple(scores.shape)}")
    check_finite("scores", scores)
    labels = check_targets(labels, inputs.shape[0]).to(inputs.device)
    if step < 1:
        raise ValueError(f"step must be >= 1 filter, got {step}")
    filters = scores.shape[1]
    counts = list(range(0, filters, step)) + [filters]
    ranks = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1).to(inputs.device)
    correct = torch.zeros(inputs.shape[0], len(counts), dtype=torch.bool)
    for i, count in enumerate(counts):
        for start in range(0, inputs.shape[0], batch_size):
            part = slice(start, start + batch_size)
            with channel_gate(layer, (ranks[part] >= count).float()):
                logits = model(inputs[part])
            if logits.shape[1] <= int(labels.max()):
                raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")
            correct[part, i] = (logits.argmax(dim=1) == labels[part]).cpu()
    return torch.tensor(counts, dtype=torch.float64) / filters, correct


def normalised_accuracy(correct) -> torch.Tensor:
    """(n,) float64 accuracy after each step divided by the accuracy with no filter removed,
    from :func:`filter_removal_correct`'s (B, n) ``correct`` (or any subset or resample of its rows)."""
    counts = torch.as_tensor(correct).sum(dim=0).to(torch.float64)
    if counts[0] == 0:
        raise ValueError("the model classifies none of the inputs correctly; the normalised accuracy is undefined")
    return counts / counts[0]


def filter_removal_curve(model: torch.nn.Module, layer: torch.nn.Module, inputs: torch.Tensor, labels, scores,
                         **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised accuracy as the highest-scored filters are removed, ``step`` at a time.

    Parameters are those of :func:`filter_removal_correct` (``options``: ``step``, ``batch_size``).

    Returns
    -------
    fractions : (n,) float64 fraction of filters removed, 0 to 1, n = ceil(K / step) + 1.
    accuracy : (n,) float64 accuracy divided by the accuracy with no filter removed.
    """
    fractions, correct = filter_removal_correct(model, layer, inputs, labels, scores, **options)
    return fractions, normalised_accuracy(correct)


def filter_removal_auc(fractions, accuracy) -> float:
    """Trapezoidal area under normalised accuracy against the fraction of filters removed."""
    return float(torch.trapezoid(torch.as_tensor(accuracy), torch.as_tensor(fractions)))
