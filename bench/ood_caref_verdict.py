"""The served verdict with a sixth test from the same pass: CARef's relative deviation.

CARef (Ling et al., CVPR 2025) scores an input by how far its pooled features z lie from the
mean features m_c of its predicted class, relative to their own size, |z - m_c|_1 / |z|_1. It
needs nothing the server does not already hold: the handler returns z beside alpha, and the
store's feature block holds m_c (fitted on val's part A for the feature-Mahalanobis test; a
class ranked in the class-independent group takes the mean of all part-A images). So it could be
served as a sixth test without a new array or a new field from the handler.

This measures whether it should be. The six tests (the served five and this one) go through the
verdict's own calibration scheme (:class:`bench.ood_extended.ExtendedVerdict`: the same split of
the held-out images, the store's groups, part-A tail models, the min-p statistic, part-B
conformal ranks); every choice here was fixed before any result of it was seen.

Keep rule (fixed before its first run, at bench/eval_ood.py's Table 7 sizes, ``--ood-test-n 4000
--ood-n 2000 --ood-shift-n 2000 --ood-fit-n 2000``, on the image model): the sixth test is served
(a store format change, made separately) if the six-test verdict's AUROC is at least the served
verdict's on at least 4 of the 5 image sets, above the upper end of the served verdict's interval
on at least 2, and its realised test FPR at 1 % lies within 1 ± 0.25 %. The clip table reports it
without a rule.
"""

from __future__ import annotations

import numpy as np

NAME = "verdict + CARef"


def relative_deviation(features: np.ndarray, class_means: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """CARef's statistic against each row's class.

    Parameters
    ----------
    features : np.ndarray
        (n, K) pooled features.
    class_means : np.ndarray
        (C, K) mean features of each class.
    classes : np.ndarray
        (n,) int class each row is scored against.

    Returns
    -------
    np.ndarray
        (n,) float64 |z - m_c|_1 / |z|_1, larger = further from the class.
    """
    z = np.asarray(features, dtype=np.float64)
    return np.abs(z - class_means[classes]).sum(axis=1) / np.abs(z).sum(axis=1)


def caref_tests(batch, features: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """(n, 6) float32: the served verdict's five test statistics (``batch``: its BatchScores,
    scored with features) and the relative deviation from the class each row was scored against."""
    return np.column_stack([batch.statistics[:, :-1],
                            relative_deviation(features, class_means, batch.classes)]).astype(np.float32)
