"""Tiny hand-built classifiers whose output is a known function of the input, for metric tests."""

from __future__ import annotations

import torch
from torch import nn


class PresenceModel(nn.Module):
    """Two classes; P(class 0) = fraction of the region's input mass still present.

    logits = [log s, log(1 - s)], s = sum(x * region) / sum(region) for an all-ones input, so
    softmax(logits)[0] = s exactly. The region defaults to the whole input.
    """

    def __init__(self, region: torch.Tensor | None = None):
        super().__init__()
        self.region = region

    def forward(self, x):
        mass = x.sum(dim=1)
        region = torch.ones_like(mass[0]) if self.region is None else self.region.to(mass.dtype)
        s = (mass * region).flatten(1).sum(1) / (region.sum() * x.shape[1])
        return torch.stack([torch.log(s), torch.log1p(-s)], dim=1)


class ThresholdModel(nn.Module):
    """Class 0 while more than half the region's mass is present, else class 1 (logits s - 0.5, 0)."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.presence = PresenceModel(region)

    def forward(self, x):
        s = torch.softmax(self.presence(x), dim=1)[:, :1]
        return torch.cat([s - 0.5, torch.zeros_like(s)], dim=1)


class ChannelVoteModel(nn.Module):
    """Inputs (B, K, 1, 1) pass through ``features`` (identity) to a linear vote.

    logit_0 = sum_k w_k A_k - bias, logit_1 = 0; the filters of ``features`` are the channels.
    """

    def __init__(self, weights: torch.Tensor, bias: float):
        super().__init__()
        self.features = nn.Identity()
        self.register_buffer("weights", weights)
        self.bias = bias

    def forward(self, x):
        activations = self.features(x).flatten(1)
        vote = activations @ self.weights - self.bias
        return torch.stack([vote, torch.zeros_like(vote)], dim=1)
