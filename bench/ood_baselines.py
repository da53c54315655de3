"""Feature-space OOD baselines for Table 7, from pytorch-ood (a dev extra): KNN, ViM,
Mahalanobis on the pooled features, ReAct + Energy and ASH-S on the target layer's feature maps;
and CARef and CADRef (Ling et al., CVPR 2025), which pytorch-ood does not have, in plain numpy.

The demo models end in global average pooling and one linear layer right after the target
layer, so the target layer's activations A (B, K, h, w) are the backbone's feature maps, their
spatial mean the penultimate features z (B, K), and the head is mean-pool then linear. Every
hyper-parameter is the method's published default, fixed before any result was seen: KNN k = 50
on unit-normalised features (CIFAR-scale setting of Sun et al. 2022), ViM with a principal
subspace of half the feature dimension, ReAct's 90th activation percentile, ASH-S pruning 65 %.

CARef and CADRef as the authors' code computes them (its defaults; fixed before any result of them
was seen). With ĉ the predicted class (arg-max logit), m_c the mean pooled feature of the fitting
images *predicted* as c, e = z - m_ĉ and s = sign(w_ĉ) the signs of the head's weights of ĉ:

    CARef(z)  = |e|_1 / |z|_1
    CADRef(z) = |max(s e, 0)|_1 / (|z|_1 E(z)) + |max(-s e, 0)|_1 / (|z|_1 Ē)

E(z) = log sum_c exp(y_c), the logit score of its default "Energy" variant, and Ē its mean over
the fitting images. A class no fitting image is predicted as takes the mean of them all (the
authors' code has no rule for it). Both are larger for more anomalous inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_ood.detector import ASH, KNN, Mahalanobis, ReAct, ViM

from explainserve.evaluation.ood import logsumexp

KNN_K = 50
REACT_PERCENTILE = 0.9
ASH_PERCENTILE = 0.65
FEATURE_DETECTORS = ("KNN", "ViM", "Mahalanobis", "ReAct+Energy", "ASH-S", "CARef", "CADRef")


class FeatureBaselines:
    """The seven detectors, fitted on training images' features.

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
        self.relative = RelativeFeatures(weight.double().numpy(), bias.double().numpy(), features)

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
        return {**{name: value.double().cpu().numpy() for name, value in found.items()},
                **self.relative.scores(z.double().numpy())}


class RelativeFeatures:
    """CARef and CADRef (module docstring), fitted on the fitting images' pooled features.

    Parameters
    ----------
    weight : np.ndarray
        (C, K) the head's weights.
    bias : np.ndarray
        (C,) its bias.
    features : np.ndarray
        (N, K) pooled features of the fitting images.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, features: np.ndarray):
        self.weight, self.bias = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
        z = np.asarray(features, dtype=np.float64)
        logits = z @ self.weight.T + self.bias
        predicted = logits.argmax(axis=1)
        self.class_means = np.repeat(z.mean(axis=0)[None], len(self.weight), axis=0)
        for class_id in np.unique(predicted):
            self.class_means[class_id] = z[predicted == class_id].mean(axis=0)
        self.mean_logit_score = float(logsumexp(logits).mean())

    def scores(self, features: np.ndarray) -> dict:
        """{"CARef": (B,), "CADRef": (B,)} float64 scores of pooled features (B, K)."""
        z = np.asarray(features, dtype=np.float64)
        logits = z @ self.weight.T + self.bias
        predicted = logits.argmax(axis=1)
        deviation = z - self.class_means[predicted]
        size = np.abs(z).sum(axis=1)
        signed = deviation * np.sign(self.weight[predicted])
        above = np.maximum(signed, 0).sum(axis=1) / size
        below = np.maximum(-signed, 0).sum(axis=1) / size
        return {"CARef": np.abs(deviation).sum(axis=1) / size,
                "CADRef": above / logsumexp(logits) + below / self.mean_logit_score}
