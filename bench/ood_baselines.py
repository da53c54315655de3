"""Feature-space OOD baselines for Table 7, from pytorch-ood (a dev extra): KNN, ViM,
Mahalanobis on the pooled features, ReAct + Energy and ASH-S on the target layer's feature maps.

The demo models end in global average pooling and one linear layer right after the target
layer, so the target layer's activations A (B, K, h, w) are the backbone's feature maps, their
spatial mean the penultimate features z (B, K), and the head is mean-pool then linear. Every
hyper-parameter is the method's published default, fixed before any result was seen: KNN k = 50
on unit-normalised features (CIFAR-scale setting of Sun et al. 2022), ViM with a principal
subspace of half the feature dimension, ReAct's 90th activation percentile, ASH-S pruning 65 %.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_ood.detector import ASH, KNN, Mahalanobis, ReAct, ViM

KNN_K = 50
REACT_PERCENTILE = 0.9
ASH_PERCENTILE = 0.65
FEATURE_DETECTORS = ("KNN", "ViM", "Mahalanobis", "ReAct+Energy", "ASH-S")


class FeatureBaselines:
    """The five detectors, fitted on training images' features.

    Parameters
    ----------
    classifier : torch.nn.Linear
        The model's head (C x K weights).
    features : np.ndarray
        (N, K) pooled training features.
    labels : np.ndarray
        (N,) their classes.
    maps : torch.Tensor
        (M, K, ...) training feature maps for ReAct's clipping threshold (a subset is enough).
    """

    def __init__(self, classifier: torch.nn.Linear, features: np.ndarray, labels: np.ndarray, maps: torch.Tensor):
        weight, bias = classifier.weight.detach().float(), classifier.bias.detach().float()
        z, y = torch.from_numpy(np.asarray(features, dtype=np.float32)), torch.from_numpy(np.asarray(labels)).long()

        def head(feature_maps: torch.Tensor) -> torch.Tensor:
            return feature_maps.flatten(2).mean(dim=2) @ weight.T + bias

        self.knn = KNN(None, k=KNN_K).fit_features(z, y)
        self.vim = ViM(None, d=z.shape[1] // 2, w=weight, b=bias).fit_features(z, y)
        self.mahalanobis = Mahalanobis(None).fit_features(z, y)
        self.react = ReAct(lambda x: x, head, percentile=REACT_PERCENTILE).fit_feature_maps(maps, torch.zeros(len(maps)).long())
        self.ash = ASH(lambda x: x, head, variant="ash-s", percentile=ASH_PERCENTILE)

    @torch.no_grad()
    def scores(self, maps: torch.Tensor) -> dict:
        """Anomaly scores (higher = more anomalous), (B,) float64 each, of feature maps (B, K, ...):
        (B, K, h, w) of an image model, (B, K, t, h, w) of a clip model."""
        z = maps.flatten(2).mean(dim=2)
        # pytorch-ood's ASH takes (B, K, h, w) only. ASH-S ranks all of a sample's activations
        # together and the head pools every position, so a clip's (t, h, w) positions laid out
        # on one axis, (B, K, t*h*w, 1), give the same scores; images are unchanged by it.
        positions = maps.flatten(2).unsqueeze(-1)
        found = {"KNN": self.knn.predict_features(z), "ViM": self.vim.predict_features(z),
                 "Mahalanobis": self.mahalanobis.predict_features(z),
                 "ReAct+Energy": self.react.predict_feature_maps(maps), "ASH-S": self.ash.predict_feature_maps(positions.clone())}
        return {name: value.double().cpu().numpy() for name, value in found.items()}
