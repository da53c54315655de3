"""Evaluation metrics for explanations (DESIGN.md section 4).

Pure torch/numpy/scikit-image. The peer baselines and the filter rankings, which import the
dev-only ``grad-cam`` and ``captum``, live beside the benchmarks (``bench/baselines.py``,
``bench/filter_rankings.py``), not in the package.
"""

from explainserve.evaluation.filter_removal import (filter_removal_auc, filter_removal_correct, filter_removal_curve,
                                                    normalised_accuracy)
from explainserve.evaluation.localisation import THRESHOLDS, pointing_game, weak_localisation
from explainserve.evaluation.perturbation import curve_auc, deletion_auc, insertion_auc, perturbation_curves
from explainserve.evaluation.superpixel_ranking import superpixel_removal, top_k_agreement

__all__ = [
    "THRESHOLDS",
    "curve_auc",
    "deletion_auc",
    "filter_removal_auc",
    "filter_removal_correct",
    "filter_removal_curve",
    "insertion_auc",
    "normalised_accuracy",
    "perturbation_curves",
    "pointing_game",
    "superpixel_removal",
    "top_k_agreement",
    "weak_localisation",
]
