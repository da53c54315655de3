"""The Explainer: a batch of raw images or clips in, prediction + every requested map out.

One probe pass (forward + guided backward) serves the prediction, SWAG's pixel scores,
Grad-CAM and the Grad-AMap filter scores; SWAG_I's superpixels, which need only the image,
are computed on a worker thread while the network runs when a core is free for them.
Jitter-CAM adds its own batched pass over the patches. Handlers and command-line tools call
this; it knows nothing of serving.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cam import grad_cam
from .devices import model_device
from .grad_amap import grad_amap
from .jitter_cam import jitter_cam
from .methods import DEFAULT_METHODS, IMAGE_METHODS, METHODS, SUPPRESSION_STEPS, VIDEO_METHODS  # noqa: F401 (part of this API)
from .probe import ProbeResult, expected_channels, input_size_failure, probe
from .surprise import REGION_SEGMENTS, FilterRegion, Suppression, filter_regions, suppress_surprise
from .limits import Limits
from .superpixels import gradient_slic, slic_iterations
from .swag import pixel_scores, swag


# SLIC weight defaults per kind: colour / score weights (thesis ch. 3 and 4). The image weights
# are the winner of bench/evaluate.py's wc, wg grid search on the demo image model (bench/REPORT.md:
# mean deletion AUC 0.151 at 12/16, 0.166 at the worst pair). The superpixel count scales with the
# input (Limits.default_n_segments, limits.default_segments).
SLIC_DEFAULTS = {
    "image": {"wc": 12.0, "wg": 16.0},
    "video": {"wc": 20.0, "wg": 9.0},
}
#: ITU-R 601-2 luma weights (Pillow's ``convert("L")``): the grey a one-channel model is given.
LUMA = (0.299, 0.587, 0.114)
SWAG_VARIANT = {
    "swag_i": "i", "swag_g": "g", "swag_i_g": "i_g",
    "swag_v_i": "i", "swag_v_g": "g", "swag_v_i_g": "i_g",
}


def spare_core() -> bool:
    """Whether this process may use more cores than torch's intra-op threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


@dataclass(frozen=True)
class ExplainOptions:
    """Per-request parameters; None takes the default (``Limits.default_n_segments``, the kind's
    ``SLIC_DEFAULTS`` weights, d = m, top-k of ``Limits.default_top_k``). Frozen: requests with equal options are batched together."""

    n_segments: int | None = None
    wc: float | None = None
    wg: float | None = None
    jitter_d: int | None = None
    top_k: int | None = None


@dataclass
class ExplanationMap:
    """One method's map at the model's input resolution.

    Attributes
    ----------
    heatmap : ndarray of float32, shape (H, W) or (T, H, W)
    segments : ndarray of int32 or None, same shape (SWAG only)
    segment_scores : ndarray of float32 or None, shape (n_segments,) (SWAG only)
    """

    heatmap: np.ndarray
    segments: np.ndarray | None = None
    segment_scores: np.ndarray | None = None


@dataclass
class SampleExplanation:
    """The answer for one sample: prediction, maps, Grad-AMap scores, pooled features (K,)
    float32 (:attr:`FilterScores.features`) and timings (seconds)."""

    classes: np.ndarray
    scores: np.ndarray
    predicted: int
    target: int
    maps: dict[str, ExplanationMap]
    alpha: np.ndarray
    label_alpha: np.ndarray | None
    features: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A batch as the network and SLIC take it: :meth:`Explainer.prepare`'s answer.

    Attributes
    ----------
    rgb : Tensor, shape (B, 3, H, W) or (B, 3, T, H, W), float32 in [0, 1]
        The samples resized to the model's input size, on the CPU (SLIC runs there); for a
        greyscale model, their grey in all three channels (the picture the model sees).
    inputs : Tensor, shape (B, C, H, W) or (B, C, T, H, W), C = 3, or 1 for a greyscale model
        ``rgb`` (its grey) normalised with the model's mean and std, on the model's device:
        what the network is given.
    """

    rgb: torch.Tensor
    inputs: torch.Tensor

    def __len__(self) -> int:
        return self.rgb.shape[0]

    @cached_property
    def images(self) -> np.ndarray:
        """ndarray of float64, shape (B, H, W, 3) or (B, T, H, W, 3), in [0, 1]: SLIC's input."""
        return self.rgb.movedim(1, -1).numpy().astype(np.float64)

    def take(self, rows: Sequence[int]) -> "Prepared":
        """The samples at ``rows`` (repeats allowed), without preparing them again."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return Prepared(self.rgb[index], self.inputs[index.to(self.inputs.device)])


@dataclass
class FilterScores:
    """The network's answer and the Grad-AMap filter scores, exactly as Explain serves them.

    Attributes
    ----------
    logits : ndarray of float32, shape (B, N)
    predicted : ndarray of int64, shape (B,)
    target : ndarray of int64, shape (B,)
        The class ``alpha`` is computed for: the requested one, else ``predicted``.
    alpha : ndarray of float32, shape (B, K)
        Grad-AMap score of each target-layer filter for ``target`` (mean over space of A * dy/dA).
    label_alpha : ndarray of float32, shape (B, K), or None
        The same for the labels, when labels were given.
    features : ndarray of float32, shape (B, K)
        The pooled features: each target-layer filter's activation averaged over every position
        (h, w for images, t, h, w for clips). They need no class, so one row serves the target
        and the label alike.
    """

    logits: np.ndarray
    predicted: np.ndarray
    target: np.ndarray
    alpha: np.ndarray
    label_alpha: np.ndarray | None
    features: np.ndarray

    @classmethod
    def of(cls, result: ProbeResult) -> "FilterScores":
        """The one place alpha is computed from a probe pass (the store, the server and the
        benchmarks all come here)."""
        label_alpha = (grad_amap(result.activations, result.extra_activation_gradients).cpu().numpy()
                       if result.extra_activation_gradients is not None else None)
        return cls(logits=result.logits.detach().cpu().numpy(), predicted=result.predicted.cpu().numpy(),
                   target=result.target.cpu().numpy(),
                   alpha=grad_amap(result.activations, result.activation_gradients).cpu().numpy(),
                   label_alpha=label_alpha, features=pooled_features(result.activations).cpu().numpy())


def pooled_features(activations: torch.Tensor) -> torch.Tensor:
    """The pooled features of a target-layer output: the mean over positions per filter.

    Parameters
    ----------
    activations : Tensor, shape (B, K, h, w) or (B, K, t, h, w)

    Returns
    -------
    Tensor, shape (B, K), in the activations' dtype (float32)
    """
    return activations.detach().flatten(2).mean(dim=2)


def normalisation_channels(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> int:
    """The model's input channel count, 3 (RGB) or 1 (greyscale), as ``mean`` and ``std`` give it.

    Raises
    ------
    ValueError
        Unless ``mean`` and ``std`` hold 3 or 1 finite values each (every std positive), as many
        as the model's first convolution takes.
    """
    mean, std = list(mean), list(std)
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise ValueError(f"mean, std: expected 3 values each (RGB), or 1 each for a greyscale model, "
                         f"got {len(mean)} and {len(std)}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(v) and v > 0 for v in std):
        raise ValueError(f"mean, std: expected finite values and positive stds, got {mean} and {std}")
    takes = expected_channels(model)
    if takes is not None and takes not in (1, 3):
        raise ValueError(f"mean, std: the model's first convolution takes {takes} channels; only RGB (3) and greyscale (1) "
                         f"models are served")
    if takes is not None and takes != len(mean):
        raise ValueError(f"mean, std: the model's first convolution takes {takes} channel(s) "
                         f"({'greyscale' if takes == 1 else 'RGB'}) but {len(mean)} value(s) each were given; "
                         f"pass {takes} each")
    return len(mean)


class Explainer:
    """Explain a CNN classifier's predictions on raw uint8 images or clips.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits; inputs (B, C, H, W) or (B, C, T, H, W) with C = 3 (RGB)
        or 1 (greyscale: the samples' luma, ``LUMA``, as Pillow converts to "L").
    kind : {"image", "video"}
    input_size : (H, W) or (T, H, W)
        The model's input size; samples are resized to it and maps come back at it.
    mean, std : sequence of 3 floats (RGB), or of 1 (greyscale)
        Normalisation of values in [0, 1]; their length is the model's channel count.
    class_names : sequence of str
        One name per logit.
    layer : str, optional
        Target layer; the architecture's default otherwise.
    device : str or torch.device, optional
        Where the network passes run ("cpu", "cuda:0"); the model is moved there. Default: the
        device of the model's parameters. SLIC always runs on the CPU.
    multi_label : bool
        The model is a multi-label classifier (N independent sigmoid outputs, trained with
        ``BCEWithLogitsLoss``): the classes' scores are each logit's sigmoid, not the softmax
        (:func:`~explainserve.probe.class_scores`). The class explained by default is the
        highest logit either way, so maps, filter scores and verdicts do not change.
    """

    def __init__(self, model: nn.Module, *, kind: str, input_size: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], class_names: Sequence[str], layer: str | None = None,
                 device: str | torch.device | None = None, multi_label: bool = False):
        if not isinstance(multi_label, bool):
            raise ValueError(f"multi_label: expected True or False, got {multi_label!r}")
        self.multi_label = multi_label
        if kind not in DEFAULT_METHODS:
            raise ValueError(f"kind: expected 'image' or 'video', got {kind!r}")
        spatial = 2 if kind == "image" else 3
        if len(input_size) != spatial or min(input_size) < 1:
            raise ValueError(f"input_size: expected {spatial} positive ints for kind {kind!r}, got {tuple(input_size)}")
        self.device = torch.device(device) if device is not None else model_device(model)
        self.model = model.to(self.device)  # every pass runs it in eval mode and leaves its flags as found
        self.kind = kind
        self.input_size = tuple(int(v) for v in input_size)
        self.channels = normalisation_channels(model, mean, std)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).reshape(self.channels, *(1,) * spatial)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).reshape(self.channels, *(1,) * spatial)
        self._luma = torch.tensor(LUMA, dtype=torch.float32).reshape(1, 3, *(1,) * spatial)
        self.class_names = list(class_names)
        # One dry pass finds the layer, the activation-map size and the number of classes.
        zeros = torch.zeros(1, self.channels, *self.input_size, device=self.device)
        try:
            dry = probe(model, zeros, layer=layer, input_gradient=False)
        except RuntimeError as error:
            raise input_size_failure(error, tuple(zeros.shape), f"input_size={self.input_size}") from None
        self.layer = dry.layer
        self.cam_size = tuple(dry.activations.shape[2:])
        self.num_filters = dry.activations.shape[1]
        if dry.logits.shape[1] != len(self.class_names):
            raise ValueError(f"class_names: the model has {dry.logits.shape[1]} outputs but {len(self.class_names)} class names were given")
        self.limits = Limits.for_model(kind=kind, input_size=self.input_size, cam_size=self.cam_size,
                                       n_classes=len(self.class_names), num_filters=self.num_filters)
        self.methods = self.limits.methods
        self._superpixel_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="superpixels")

    # -- validation -------------------------------------------------------------------
    def slic_options(self, options: ExplainOptions) -> dict:
        """SLIC's n_segments, wc and wg: the request's, or the defaults (n_segments scaled to
        the input, ``limits.default_n_segments``; the kind's weights); and its iteration count
        for that many superpixels (:func:`explainserve.superpixels.slic_iterations`)."""
        defaults = dict(SLIC_DEFAULTS[self.kind], n_segments=self.limits.default_n_segments)
        chosen = {name: defaults[name] if getattr(options, name) is None else getattr(options, name) for name in defaults}
        return dict(chosen, max_num_iter=slic_iterations(self.kind, chosen["n_segments"]))

    def check_request(self, methods: Sequence[str], options: ExplainOptions = ExplainOptions(),
                      target: int | None = None, label: int | None = None) -> None:
        """Raise ValueError, naming the parameter and its accepted range, if a request is invalid."""
        limits = self.limits
        limits.check_methods(methods)
        self.check_class(target, "target")
        self.check_class(label, "label")
        limits.top_k(options.top_k)
        limits.check_options(n_segments=options.n_segments, wc=options.wc, wg=options.wg, jitter_d=options.jitter_d)

    def check_class(self, value: int | None, name: str = "target") -> None:
        """Raise ValueError unless ``value`` is a class id of this model (None passes)."""
        self.limits.check_class(value, name)

    def preprocess(self, samples: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack uint8 samples into RGB in [0, 1], resized to ``input_size``.

        Returns
        -------
        Tensor, shape (B, 3, H, W) or (B, 3, T, H, W), float32 in [0, 1]
        """
        if len(samples) == 0:
            raise ValueError("samples: the batch is empty; expected at least one sample")
        expected_ndim = 3 if self.kind == "image" else 4
        tensors = []
        for index, sample in enumerate(samples):
            sample = np.asarray(sample)
            if sample.dtype != np.uint8:
                raise ValueError(f"samples[{index}]: expected uint8 values, got {sample.dtype}")
            if sample.ndim != expected_ndim or sample.shape[-1] != 3:
                layout = "(H, W, 3)" if self.kind == "image" else "(T, H, W, 3)"
                raise ValueError(f"samples[{index}]: expected an RGB {self.kind} of shape {layout}, got {sample.shape}")
            if self.kind == "video" and sample.shape[0] != self.input_size[0]:
                raise ValueError(f"samples[{index}]: expected a clip of {self.input_size[0]} frames, got {sample.shape[0]}")
            # Copied while converted: a read-only array (np.asarray of a PIL image) then needs no
            # copy of its own, and torch.from_numpy would warn about it.
            frames = torch.tensor(np.ascontiguousarray(sample), dtype=torch.float32).div_(255.0)
            frames = frames.reshape(-1, *sample.shape[-3:]).permute(0, 3, 1, 2)  # (T or 1, 3, h, w)
            if tuple(frames.shape[-2:]) != self.input_size[-2:]:
                frames = F.interpolate(frames, size=self.input_size[-2:], mode="bilinear", align_corners=False,
                                       antialias=True).clamp_(0, 1)
            tensors.append(frames[0] if self.kind == "image" else frames.permute(1, 0, 2, 3))
        return torch.stack(tensors)

    def prepare(self, samples: Sequence[np.ndarray] | Prepared) -> Prepared:
        """Resize and normalise a batch once, for every pass that follows.

        Parameters
        ----------
        samples : list of uint8 ndarray, each (H, W, 3) or (T, H, W, 3); a Prepared passes through

        Returns
        -------
        Prepared : the RGB in [0, 1], the normalised inputs, and (on demand) SLIC's images
        """
        if isinstance(samples, Prepared):
            return samples
        rgb = self.preprocess(samples)
        if self.channels == 1:
            grey = (rgb * self._luma).sum(dim=1, keepdim=True)
            return Prepared(grey.expand_as(rgb).contiguous(), (grey.to(self.device) - self.mean) / self.std)
        return Prepared(rgb, (rgb.to(self.device) - self.mean) / self.std)

    def filter_scores(self, samples: Sequence[np.ndarray] | Prepared, targets: Sequence[int | None] | None = None,
                      labels: Sequence[int | None] | None = None) -> FilterScores:
        """Logits, prediction and Grad-AMap alpha exactly as Explain serves them, from one
        forward and backward pass without input gradient: what the distribution store is
        built from and what the benchmarks score.

        Parameters
        ----------
        samples : list of uint8 ndarray, or Prepared
        targets : sequence of (int or None), optional
            Class alpha is computed for, per sample; None takes the predicted class.
        labels : sequence of (int or None), optional
            Classes whose alpha is returned as ``label_alpha`` (an entry of None repeats the target's).
        """
        prepared = self.prepare(samples)
        targets, labels = self._per_sample(len(prepared), targets, labels)
        return FilterScores.of(self._network_pass(prepared, targets, labels, input_gradient=False))

    # -- the work ---------------------------------------------------------------------
    def explain(self, samples: Sequence[np.ndarray] | Prepared, methods: Sequence[str] | None = None,
                options: ExplainOptions = ExplainOptions(), targets: Sequence[int | None] | None = None,
                labels: Sequence[int | None] | None = None) -> list[SampleExplanation]:
        """Explain a batch in one probe pass.

        Parameters
        ----------
        samples : list of uint8 ndarray, each (H, W, 3) or (T, H, W, 3), or Prepared
        methods : sequence of str, optional
            Subset of ``self.methods``; ``DEFAULT_METHODS[kind]`` when None, none for an
            empty list (prediction and Grad-AMap scores only).
        options : ExplainOptions
        targets : sequence of (int or None), optional
            Class to explain per sample; None takes the predicted class.
        labels : sequence of (int or None), optional
            Ground-truth class per sample; its Grad-AMap scores are returned as ``label_alpha``.
        """
        started = time.perf_counter()
        methods = list(DEFAULT_METHODS[self.kind] if methods is None else methods)
        targets, labels = self._per_sample(len(samples), targets, labels)
        for target, label in zip(targets, labels):
            self.check_request(methods, options, target, label)
        swag_methods = [m for m in methods if m in SWAG_VARIANT]
        slic_options = self.slic_options(options)

        prepared = self.prepare(samples)
        timings = {"preprocess": time.perf_counter() - started}
        colour_segments = self._start_colour_superpixels(prepared, swag_methods, slic_options)

        network_started = time.perf_counter()
        result = self._network_pass(prepared, targets, labels, input_gradient=bool(swag_methods))
        scores = FilterScores.of(result)
        timings["network"] = time.perf_counter() - network_started

        maps: list[dict[str, ExplanationMap]] = [{} for _ in range(len(prepared))]
        self._cam_maps(prepared, result, methods, options, maps, timings)
        if swag_methods:
            superpixels_started = time.perf_counter()
            self._swag_maps(prepared, result, swag_methods, slic_options, colour_segments, maps)
            timings["superpixels"] = time.perf_counter() - superpixels_started
        top_scores, top_classes = result.top_k(self.limits.top_k(options.top_k), self.multi_label)
        timings["total"] = time.perf_counter() - started
        return [
            SampleExplanation(
                classes=top_classes[b].cpu().numpy(),
                scores=top_scores[b].cpu().numpy(),
                predicted=int(scores.predicted[b]),
                target=int(scores.target[b]),
                maps=maps[b],
                alpha=scores.alpha[b],
                label_alpha=scores.label_alpha[b] if scores.label_alpha is not None and labels[b] is not None else None,
                features=scores.features[b],
                timings=dict(timings),
            )
            for b in range(len(prepared))
        ]

    # -- the steps of explain() -------------------------------------------------------
    def _per_sample(self, batch: int, targets, labels) -> tuple[list, list]:
        """Targets and labels as one checked entry (class id or None) per sample."""
        targets = list(targets) if targets is not None else [None] * batch
        labels = list(labels) if labels is not None else [None] * batch
        for name, values in (("targets", targets), ("labels", labels)):
            if len(values) != batch:
                raise ValueError(f"{name}: expected one entry per sample ({batch}), got {len(values)}")
        for target, label in zip(targets, labels):
            self.check_class(target, "target")
            self.check_class(label, "label")
        return targets, labels

    def _network_pass(self, prepared: Prepared, targets: list, labels: list, *, input_gradient: bool) -> ProbeResult:
        """The probe pass: prediction, target-layer activations and gradients (and the guided
        input gradient when SWAG needs it); labels, if any, backpropagated beside the targets."""
        extra = labels if any(label is not None for label in labels) else None
        return probe(self.model, prepared.inputs, layer=self.layer, target=targets, input_gradient=input_gradient,
                     extra_targets=extra)

    def _start_colour_superpixels(self, prepared: Prepared, swag_methods: list[str], slic_options: dict) -> dict[int, Future]:
        """Colour-only superpixels need no gradient: start them before the network pass, always
        beside a GPU pass, and on the CPU only when torch leaves a core idle; on a machine whose
        cores torch already uses, SLIC in parallel slows the network pass by more than it saves."""
        if not any(SWAG_VARIANT[m] == "i" for m in swag_methods):
            return {}
        if self.device.type == "cpu" and not spare_core():
            return {}
        return {b: self._superpixel_pool.submit(gradient_slic, prepared.images[b], None, variant="i", **slic_options)
                for b in range(len(prepared))}

    def _cam_maps(self, prepared: Prepared, result: ProbeResult, methods: list[str], options: ExplainOptions,
                  maps: list[dict], timings: dict) -> None:
        """Grad-CAM from the probe pass, and Jitter-CAM from its own batched pass over the patches."""
        if "grad_cam" in methods:
            heatmaps = grad_cam(result.activations, result.activation_gradients, self.input_size).cpu().numpy()
            for b, heatmap in enumerate(heatmaps):
                maps[b]["grad_cam"] = ExplanationMap(heatmap)
        if "jitter_cam" in methods:
            jitter_started = time.perf_counter()
            heatmaps = jitter_cam(self.model, prepared.inputs, result.target, cam_size=self.cam_size, layer=self.layer,
                                  d=options.jitter_d).cpu().numpy()
            for b, heatmap in enumerate(heatmaps):
                maps[b]["jitter_cam"] = ExplanationMap(heatmap)
            timings["jitter_cam"] = time.perf_counter() - jitter_started

    def _swag_maps(self, prepared: Prepared, result: ProbeResult, swag_methods: list[str], slic_options: dict,
                   colour_segments: dict[int, Future], maps: list[dict]) -> None:
        """SWAG's maps: SLIC per sample and variant on the pool (colour-only ones may have
        started already), each superpixel weighted by its mean guided gradient."""
        scores = pixel_scores(result, prepared.inputs, "guided")
        images = prepared.images
        jobs = {}
        for b in range(len(prepared)):
            for method in swag_methods:
                variant = SWAG_VARIANT[method]
                if variant == "i" and b in colour_segments:
                    jobs[b, method] = colour_segments[b]
                else:
                    jobs[b, method] = self._superpixel_pool.submit(
                        gradient_slic, images[b], None if variant == "i" else scores[b], variant=variant, **slic_options)
        for (b, method), future in jobs.items():
            explanation = swag(images[b], scores[b], segments=future.result())
            maps[b][method] = ExplanationMap(explanation.heatmap, explanation.segments, explanation.segment_scores)

    # -- regions (thesis 6.3.2, 6.4.1) ------------------------------------------------
    def filter_regions(self, samples: Sequence[np.ndarray] | Prepared, filters: Sequence[int],
                       targets: Sequence[int | None] | None = None,
                       n_segments: int = REGION_SEGMENTS) -> list[FilterRegion]:
        """The region of each sample that triggered one target-layer filter (thesis 6.3.2).

        One extra forward and backward pass for the batch; see
        :func:`explainserve.surprise.filter_regions`.

        Parameters
        ----------
        samples : list of uint8 ndarray, each (H, W, 3) or (T, H, W, 3), or Prepared
        filters : sequence of int
            Target-layer filter per sample, in [0, ``num_filters`` - 1].
        targets : sequence of (int or None), optional
            Class whose score is backpropagated per sample; None takes the predicted class.
        n_segments : int
            Approximate number of colour SLIC superpixels (supervoxels for clips).

        Returns
        -------
        list of FilterRegion, maps at ``input_size``
        """
        prepared = self.prepare(samples)
        targets = list(targets) if targets is not None else [None] * len(prepared)
        if len(filters) != len(prepared) or len(targets) != len(prepared):
            raise ValueError(f"filters, targets: expected one entry per sample ({len(prepared)}), "
                             f"got {len(filters)} and {len(targets)}")
        for target in targets:
            self.check_class(target)
        return filter_regions(self.model, prepared.inputs, list(filters), target=targets,
                              images=prepared.rgb.movedim(1, -1).numpy(), layer=self.layer, n_segments=n_segments)

    def suppress_surprise(self, samples: Sequence[np.ndarray] | Prepared, regions: Sequence[FilterRegion],
                          steps: int = SUPPRESSION_STEPS) -> list[Suppression]:
        """Delete each sample's region superpixels, best first, until the prediction changes
        (thesis 6.4.1); one batched forward pass. See :func:`explainserve.surprise.suppress_surprise`.

        Parameters
        ----------
        samples : list of uint8 ndarray, each (H, W, 3) or (T, H, W, 3), or Prepared
            The samples :meth:`filter_regions` was given.
        regions : sequence of FilterRegion
            What :meth:`filter_regions` returned for them.
        steps : int
            The most segments deleted per sample, in [1, 100].
        """
        return suppress_surprise(self.model, self.prepare(samples).inputs, regions, steps=steps,
                                 multi_label=self.multi_label)

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the superpixel threads (waiting for running jobs); the Explainer is unusable after."""
        self._superpixel_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
