"""The explanation methods the evaluation compares, each as ``maps(subject, indices, targets)``.

Ours run through the Explainer (exactly what the service returns); the baselines are the peer
libraries' implementations from ``bench/baselines.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from skimage.segmentation import relabel_sequential

from bench.eval_subjects import Subject
from bench import baselines
from explainserve.explainer import ExplainOptions
from explainserve.probe import probe
from explainserve.superpixels import gradient_slic
from explainserve.swag import pixel_scores

# Superpixels shared by LIME_G and the superpixel-ranking table (BMVC Tables 1-2): gradient
# SLIC (SWAG_G's) with 50 segments, about the size of LIME's Quickshift segments at 64 px.
RANKING_SEGMENTS = 50
# LIME's Quickshift kernel is 4 px at 224 px; 1 px at 64 px gives it about 50 segments too.
QUICKSHIFT_KERNEL = 1
CHUNK = 32
# Methods of 1000 forward passes or more per image: Tables 1-2 run them on the first --costly-n images.
COSTLY = ("ScoreCAM", "AblationCAM", "LIME-1000", "LIME_G-1000")


@dataclass
class Method:
    """A named explanation method: ``run(subject, indices, targets) -> (B, *S) float32 maps``."""

    label: str
    run: Callable[[Subject, np.ndarray, torch.Tensor], np.ndarray]


def ours(label: str, method: str, options: ExplainOptions = ExplainOptions()) -> Method:
    """One of the Explainer's methods, in chunks of ``CHUNK`` samples."""

    def run(subject: Subject, indices, targets) -> np.ndarray:
        maps = []
        for start in range(0, len(indices), CHUNK):
            part = indices[start : start + CHUNK]
            results = subject.explainer.explain(list(subject.samples[part]), [method], options,
                                                targets=[int(t) for t in targets[start : start + CHUNK]])
            maps.extend(result.maps[method].heatmap for result in results)
        return np.stack(maps).astype(np.float32)

    return Method(label, run)


def peer(label: str, explain: Callable) -> Method:
    """A baseline with the uniform signature ``explain(model, inputs, target)``."""

    def run(subject: Subject, indices, targets) -> np.ndarray:
        maps = [explain(subject.model, subject.inputs(indices[start : start + CHUNK]), targets[start : start + CHUNK])
                for start in range(0, len(indices), CHUNK)]
        return np.concatenate(maps).astype(np.float32)

    return Method(label, run)


def gradient_segmenter(explainer) -> Callable:
    """Segmenter ``(model, inputs, target) -> (B, *S) int64``: gradient SLIC (SWAG_G's variant)
    with ``RANKING_SEGMENTS`` segments, labels made sequential."""

    def segment(model, inputs, target) -> np.ndarray:
        scores = pixel_scores(probe(model, inputs, layer=explainer.layer, target=target), inputs)
        images = (inputs * explainer.std + explainer.mean).clamp(0, 1).movedim(1, -1).double().numpy()
        return np.stack([relabel_sequential(gradient_slic(image, score, variant="g", n_segments=RANKING_SEGMENTS))[0]
                         for image, score in zip(images, scores)]).astype(np.int64)

    return segment


def image_methods(subject: Subject, wc: float, wg: float, lime_samples: int = 1000) -> list[Method]:
    """Every image method of Table 1, ours first, with SWAG_I+G at weights (wc, wg)."""
    layer = subject.explainer.layer
    quickshift = baselines.QuickshiftSegmenter(subject.explainer.mean.flatten(), subject.explainer.std.flatten(),
                                               kernel_size=QUICKSHIFT_KERNEL)
    return [
        ours("Grad-CAM", "grad_cam"),
        ours("Jitter-CAM", "jitter_cam"),
        ours("SWAG_I", "swag_i"),
        ours("SWAG_G", "swag_g"),
        ours("SWAG_I+G", "swag_i_g", ExplainOptions(wc=wc, wg=wg)),
        peer("Grad-CAM++", baselines.CamBaseline("grad_cam_pp", layer)),
        peer("XGrad-CAM", baselines.CamBaseline("xgrad_cam", layer)),
        peer("ScoreCAM", baselines.CamBaseline("score_cam", layer)),
        peer("AblationCAM", baselines.CamBaseline("ablation_cam", layer)),
        peer(f"LIME-{lime_samples}", baselines.LimeBaseline(lime_samples, quickshift)),
        peer(f"LIME_G-{lime_samples}", baselines.LimeBaseline(lime_samples, gradient_segmenter(subject.explainer))),
        peer("IG-15", baselines.integrated_gradients),
        peer("Guided backprop", baselines.guided_backprop),
        peer("Random", baselines.random_map),
        peer("Centre", baselines.centre_map),
    ]


def video_methods(subject: Subject) -> list[Method]:
    """The clip methods of Table 3: SWAG-V variants, Grad-CAM (ours) and Grad-CAM++ (grad-cam)."""
    return [
        ours("SWAG-V_I", "swag_v_i"),
        ours("SWAG-V_G", "swag_v_g"),
        ours("SWAG-V_I+G", "swag_v_i_g"),
        ours("Grad-CAM", "grad_cam"),
        peer("Grad-CAM++", baselines.CamBaseline("grad_cam_pp", subject.explainer.layer)),
        peer("Random", baselines.random_map),
        peer("Centre", baselines.centre_map),
    ]


def seconds_per_explanation(method: Method, subject: Subject, indices, targets) -> list[float]:
    """Wall-clock seconds of ``method`` on each sample alone (batch of 1)."""
    seconds = []
    for i in range(len(indices)):
        started = time.perf_counter()
        method.run(subject, indices[i : i + 1], targets[i : i + 1])
        seconds.append(time.perf_counter() - started)
    return seconds
