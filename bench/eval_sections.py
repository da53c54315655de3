"""The evaluation's experiments; each returns plain numbers for the report.

Explanations are made for the class the model predicts on the unperturbed input (what the
service explains by default); the perturbation metrics record that class's softmax.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
from tqdm import tqdm

from bench.eval_methods import Method, gradient_segmenter, ours, seconds_per_explanation
from bench.eval_subjects import Subject
from explainserve.evaluation import (
    THRESHOLDS,
    curve_auc,
    filter_removal_auc,
    filter_removal_correct,
    normalised_accuracy,
    perturbation_curves,
    pointing_game,
    superpixel_removal,
    top_k_agreement,
    weak_localisation,
)
from bench.baselines import LimeBaseline
from bench.filter_rankings import RANKINGS, filter_scores, layer_signals
from explainserve.explainer import ExplainOptions
from explainserve.probe import probe
from explainserve.swag import PIXEL_SOURCES, pixel_scores, segment_means

GRID = tuple(range(4, 21, 2))
# The thesis's 15 px pointing tolerance is for about 224 px inputs; keep the same fraction.
POINTING_TOLERANCE_224 = 15.0
# Inputs per forward pass of the deletion / insertion, superpixel-removal and filter-removal
# metrics: 4x the library's default. At a fixed memory layout the model's per-sample outputs do
# not depend on the batch size (the same numbers bit for bit), and 2 cores run more images/s.
PERTURBATION_BATCH = 256


def predicted(subject: Subject, indices) -> torch.Tensor:
    """Classes the model predicts on samples ``indices``."""
    with torch.no_grad():
        return torch.cat([subject.model(subject.inputs(indices[s : s + 64])).argmax(1)
                          for s in range(0, len(indices), 64)])


def mean_sem(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def perturbation(subject: Subject, indices, targets, maps) -> dict:
    """Deletion and insertion curves (B, 29) and per-sample AUCs of one method's maps."""
    inputs = subject.inputs(indices)
    result = {}
    for mode in ("deletion", "insertion"):
        curves = perturbation_curves(subject.scoring_model, inputs, torch.from_numpy(maps), mode, target=targets,
                                     batch_size=PERTURBATION_BATCH)
        result[mode] = curve_auc(curves).numpy()
        result[f"{mode}_curve"] = curves.mean(0).numpy()
    return result


def localisation(subject: Subject, indices, maps) -> dict:
    """Best-threshold localisation error (%) per family and, for images, pointing-game accuracy (%)."""
    result = {family: weak_localisation(maps, subject.boxes[indices], family) for family in THRESHOLDS}
    if maps.ndim == 3:
        tolerance = POINTING_TOLERANCE_224 * maps.shape[-1] / 224
        result["pointing"] = 100 * pointing_game(maps, subject.masks[indices], tolerance).mean()
    return result


def grid_search(subject: Subject, indices) -> dict:
    """Mean deletion AUC of SWAG_I+G for every (wc, wg) in ``GRID`` x ``GRID``."""
    targets = predicted(subject, indices)
    auc = np.zeros((len(GRID), len(GRID)))
    with tqdm(total=auc.size, desc="wc/wg grid") as progress:
        for i, wc in enumerate(GRID):
            for j, wg in enumerate(GRID):
                maps = ours("", "swag_i_g", ExplainOptions(wc=wc, wg=wg)).run(subject, indices, targets)
                curves = perturbation_curves(subject.scoring_model, subject.inputs(indices), torch.from_numpy(maps),
                                             "deletion", target=targets, batch_size=PERTURBATION_BATCH)
                auc[i, j] = curve_auc(curves).mean().item()
                progress.update()
    i, j = np.unravel_index(np.argmin(auc), auc.shape)
    return {"auc": auc, "winner": (float(GRID[i]), float(GRID[j]))}


def compare_methods(subject: Subject, indices, methods: list[Method], keep: int = 8, targets=None) -> dict:
    """Perturbation and localisation metrics of every method; the first ``keep`` maps are kept.
    ``targets``: ``predicted(subject, indices)``, when the caller has it already."""
    targets = predicted(subject, indices) if targets is None else targets
    results = {}
    for method in tqdm(methods, desc=f"{subject.explainer.kind} methods"):
        maps = method.run(subject, indices, targets)
        results[method.label] = {**perturbation(subject, indices, targets, maps),
                                 **localisation(subject, indices, maps), "maps": maps[:keep]}
    return results


def costs(subject: Subject, indices, methods: list[Method]) -> dict[str, float]:
    """Median seconds per explanation, batch of 1, each method on the same samples in turn."""
    targets = predicted(subject, indices)
    for method in methods:  # warm-up: thread pools, allocator, lazy imports
        seconds_per_explanation(method, subject, indices[:1], targets[:1])
    seconds = {method.label: [] for method in methods}
    for i in tqdm(range(len(indices)), desc="timing"):
        for method in methods:  # interleaved, so that machine noise hits every method alike
            seconds[method.label] += seconds_per_explanation(method, subject, indices[i : i + 1], targets[i : i + 1])
    return {label: statistics.median(values) for label, values in seconds.items()}


def filter_removal(subject: Subject, indices) -> dict:
    """Normalised accuracy curves and AUCs as filters are removed, per ranking, scored for the true
    class; with each ranking's per-image outcome (``correct`` (B, n) bool) for the paired bootstrap."""
    inputs = subject.inputs(indices)
    labels = torch.as_tensor(subject.labels[indices])
    signals = layer_signals(subject.model, subject.layer, inputs, labels)
    results = {}
    for ranking in tqdm(RANKINGS, desc="filter removal"):
        fractions, correct = filter_removal_correct(subject.scoring_model, subject.layer, inputs, labels,
                                                    filter_scores(signals, ranking), batch_size=PERTURBATION_BATCH)
        accuracy = normalised_accuracy(correct)
        results[ranking] = {"auc": filter_removal_auc(fractions, accuracy), "curve": accuracy.numpy(), "correct": correct}
    results["fractions"] = fractions
    with torch.no_grad():
        results["accuracy"] = float((subject.model(inputs).argmax(1) == labels).double().mean())
    return results


def superpixel_ranking(subject: Subject, indices, lime_samples=(50, 100, 500, 1000)) -> dict:
    """BMVC Tables 1-2 on shared gradient-SLIC superpixels: removal % and top-k agreement with LIME-1000."""
    targets = predicted(subject, indices)
    inputs = subject.inputs(indices)
    segments = gradient_segmenter(subject.explainer)(subject.model, inputs, targets)
    result = probe(subject.model, inputs, layer=subject.explainer.layer, target=targets, vanilla_gradient=True)
    scores = {f"SWAG[{source}]": [segment_means(m, s) for m, s in zip(pixel_scores(result, inputs, source), segments)]
              for source in PIXEL_SOURCES}
    for n in tqdm(lime_samples, desc="LIME on shared superpixels"):
        scores[f"LIME-{n}"] = LimeBaseline(n, None).segment_scores(subject.model, inputs, targets, segments)
    reference = scores[f"LIME-{max(lime_samples)}"]
    scores[f"LIME-{max(lime_samples)} (seed 1)"] = LimeBaseline(max(lime_samples), None, seed=1).segment_scores(
        subject.model, inputs, targets, segments)
    generator = np.random.default_rng(0)
    scores["Random"] = [generator.random(len(s)) for s in reference]
    table = {}
    for label, values in tqdm(scores.items(), desc="superpixel removal"):
        table[label] = {
            "best": 100 * superpixel_removal(subject.scoring_model, inputs, segments, values, "best", target=targets,
                                               batch_size=PERTURBATION_BATCH).mean(),
            "worst": 100 * superpixel_removal(subject.scoring_model, inputs, segments, values, "worst", target=targets,
                                               batch_size=PERTURBATION_BATCH).mean(),
            "top1": 100 * top_k_agreement(values, reference, 1).mean(),
            "top5": 100 * top_k_agreement(values, reference, 5).mean(),
        }
    table["segments"] = float(np.mean([s.max() + 1 for s in segments]))
    return table
