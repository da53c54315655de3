"""Baseline explanations from peer libraries, behind one signature.

Every baseline is a callable ``explain(model, inputs, target) -> (B, *S) float32 ndarray``:
``inputs`` is a normalised (B, C, H, W) or (B, C, T, H, W) tensor, ``target`` a (B,) tensor of
classes, and the map has one value per position (S = (H, W) or (T, H, W)), higher meaning more
important. The algorithms are the peers' own (``grad-cam``, ``captum``); this module only adapts
their inputs and outputs. Used for evaluation, never in the serving path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import GuidedBackprop, IntegratedGradients, Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from pytorch_grad_cam import AblationCAM, GradCAM, GradCAMPlusPlus, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage.segmentation import quickshift, relabel_sequential

from bench.eval_subjects import ChannelsLast

CAM_METHODS = {
    "grad_cam": GradCAM,
    "grad_cam_pp": GradCAMPlusPlus,
    "xgrad_cam": XGradCAM,
    "score_cam": ScoreCAM,
    "ablation_cam": AblationCAM,
}


def _channel_saliency(attribution: torch.Tensor) -> np.ndarray:
    """max over channels of |attribution| (B, C, *S) -> (B, *S), the SWAG pixel-score reduction."""
    return attribution.detach().abs().amax(dim=1).cpu().numpy().astype(np.float32)


class CamBaseline:
    """A CAM method of the ``grad-cam`` package on one target layer.

    Parameters
    ----------
    method : one of ``CAM_METHODS``.
    layer : dotted name of the target layer in the model (e.g. "layer4").
    batch_size : perturbed inputs per forward pass (ScoreCAM and AblationCAM only); the maps do
        not depend on it, the time does.
    """

    def __init__(self, method: str, layer: str, batch_size: int = 256):
        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {tuple(CAM_METHODS)}, got {method!r}")
        self.method, self.layer, self.batch_size = method, layer, batch_size

    def __call__(self, model, inputs, target) -> np.ndarray:
        cam_class = CAM_METHODS[self.method]
        with cam_class(model=model, target_layers=[model.get_submodule(self.layer)]) as cam:
            if hasattr(cam, "batch_size"):
                cam.batch_size = self.batch_size
            targets = [ClassifierOutputTarget(int(c)) for c in torch.as_tensor(target).view(-1)]
            # grad-cam runs its own backward pass; inputs must not carry someone else's graph.
            maps = cam(input_tensor=inputs.detach(), targets=targets)
        return np.asarray(maps, dtype=np.float32)


def integrated_gradients(model, inputs, target, n_steps: int = 15) -> np.ndarray:
    """captum Integrated Gradients from an all-zero baseline, ``n_steps`` (15 as TorchServe's explain)."""
    attribution = IntegratedGradients(model).attribute(inputs, target=target, n_steps=n_steps, baselines=0.0)
    return _channel_saliency(attribution)


def guided_backprop(model, inputs, target) -> np.ndarray:
    """captum Guided Backpropagation (ReLU modules only), max |.| over channels."""
    return _channel_saliency(GuidedBackprop(model).attribute(inputs, target=target))


def random_map(model, inputs, target, seed: int = 0) -> np.ndarray:
    """Uniform noise: the ranking a method must beat."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((inputs.shape[0], *inputs.shape[2:]), generator=generator).numpy()


def centre_map(model, inputs, target) -> np.ndarray:
    """Gaussian centred in every frame, sigma = a quarter of each side: the centre-bias baseline."""
    height, width = inputs.shape[-2:]
    rows = (np.arange(height) - (height - 1) / 2) / (height / 4)
    cols = (np.arange(width) - (width - 1) / 2) / (width / 4)
    frame = np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2)).astype(np.float32)
    return np.broadcast_to(frame, (inputs.shape[0], *inputs.shape[2:])).copy()


class QuickshiftSegmenter:
    """Quickshift superpixels of the de-normalised RGB image, as LIME uses (its default parameters).

    Parameters
    ----------
    mean, std : per-channel normalisation of the inputs, to undo before segmenting.
    kernel_size, max_dist, ratio : ``skimage.segmentation.quickshift`` parameters.
    """

    def __init__(self, mean, std, kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.kernel_size, self.max_dist, self.ratio = kernel_size, max_dist, ratio

    def __call__(self, model, inputs, target) -> np.ndarray:
        images = (inputs.detach().cpu() * self.std + self.mean).clamp(0, 1).permute(0, 2, 3, 1).double().numpy()
        labels = [
            quickshift(image, kernel_size=self.kernel_size, max_dist=self.max_dist, ratio=self.ratio, rng=0)
            for image in images
        ]
        return np.stack([relabel_sequential(label)[0] for label in labels]).astype(np.int64)


Segmenter = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], np.ndarray]


class LimeBaseline:
    """captum LIME on superpixels from ``segmenter`` with the original LIME's settings.

    Probabilities are explained (as the LIME package does), the surrogate is a ridge
    regression (alpha = 1) and samples are weighted by an exponential kernel of width 0.25
    on the cosine distance. Removed superpixels are set to 0 (the mean in normalised space).

    Parameters
    ----------
    n_samples : perturbed samples per explanation.
    segmenter : callable ``(model, inputs, target) -> (B, *S) int labels 0..n-1``.
    batch_size : perturbed samples per forward pass (the samples do not depend on it).
    seed : seeds torch before sampling so runs are repeatable.

    The perturbed images run channels-last (``bench.eval_subjects.ChannelsLast``): the same
    probabilities to the last float32 bits, faster.
    """

    def __init__(self, n_samples: int, segmenter: Segmenter, batch_size: int = 256, seed: int = 0):
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}")
        self.n_samples, self.segmenter, self.batch_size, self.seed = n_samples, segmenter, batch_size, seed

    def segment_scores(self, model, inputs, target, segments) -> list[np.ndarray]:
        """LIME coefficient of every superpixel: B arrays (n_b,)."""

        forward = ChannelsLast(model)

        def probabilities(batch):
            return torch.softmax(forward(batch), dim=1)

        lime = Lime(
            probabilities,
            interpretable_model=SkLearnRidge(alpha=1.0),
            similarity_func=get_exp_kernel_similarity_function("cosine", kernel_width=0.25),
        )
        scores = []
        for b in range(inputs.shape[0]):
            torch.manual_seed(self.seed)
            mask = torch.as_tensor(segments[b], device=inputs.device).long()
            coefficients = lime.attribute(
                inputs[b : b + 1].detach(),
                target=int(target[b]),
                baselines=0.0,
                feature_mask=mask.expand_as(inputs[b]).unsqueeze(0),
                n_samples=self.n_samples,
                perturbations_per_eval=self.batch_size,
                return_input_shape=False,
            )
            scores.append(coefficients.detach().view(-1).cpu().numpy().astype(np.float64))
        return scores

    def __call__(self, model, inputs, target) -> np.ndarray:
        segments = self.segmenter(model, inputs, target)
        scores = self.segment_scores(model, inputs, target, segments)
        return np.stack([s[seg] for s, seg in zip(scores, segments)]).astype(np.float32)

