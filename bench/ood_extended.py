"""The verdict with one more test from the same network pass: the energy of the logits.

The issue asks whether a logit- or feature-space test raises the verdict's AUROC. The probe
pass that yields alpha also yields the logits, so the energy E(x) = -log sum_c exp(y_c) needs
nothing more from the handler. This fits the verdict's own calibration scheme with four tests
instead of three, on the same held-out images and the same split (``split_parts``: within each
predicted class, even positions part A, odd part B), with the store's groups (a class ranked on
its own in the store is here too; the others share the class-independent group):

- part A: the tail model of each of the four tests (``fit_tail_grid``);
- the combined statistic: the largest tail evidence of the four (a min-p statistic);
- part B: its conformal ranks (``interpolated_p_values``); flagged when p < the target rate.

Every choice above was fixed before any result of it was seen. Being a bench evaluation, the
server's verdict is unchanged; serving it would take the logits' energy into the store's
calibration (an additive change: the handler already returns the logits).
"""

from __future__ import annotations

import numpy as np

from explainserve.anomaly.calibration import MAX_CLASS_RANKS, MAX_FALLBACK_RANKS, split_parts, within_class_position
from explainserve.anomaly.conformal import RankTable, fit_tail_grid, interpolated_p_values, sorted_ranks, tail_evidence
from explainserve.evaluation.ood import energy_score

NAME = "verdict + energy"
#: The store's source of a class ranked on its own held-out images.
OWN = "class"


def extended_tests(batch, logits: np.ndarray) -> np.ndarray:
    """(n, 4) float32: the verdict's three test statistics and the energy, larger = more anomalous."""
    return np.column_stack([batch.statistics[:, :3], energy_score(logits)]).astype(np.float32)


class ExtendedVerdict:
    """The four-test verdict, calibrated on held-out images.

    Parameters
    ----------
    tests : np.ndarray
        (n, 4) :func:`extended_tests` of the held-out images, in dataset order.
    classes : np.ndarray
        (n,) their predicted classes.
    own : np.ndarray
        (C,) bool, the classes the store ranks on their own images.
    target_fpr : float
    """

    def __init__(self, tests: np.ndarray, classes: np.ndarray, own: np.ndarray, target_fpr: float):
        num_classes = len(own)
        part_b = split_parts(classes)
        ranked = part_b & (within_class_position(classes, part_b) < MAX_CLASS_RANKS)
        pooled_grid = fit_tail_grid(tests[~part_b])
        # Group g < C: class g on its own; g == C: the class-independent group.
        self.grids = np.repeat(pooled_grid[None], num_classes + 1, axis=0)
        tables = []
        for class_id in range(num_classes):
            rows = ranked & (classes == class_id) if own[class_id] else np.zeros(len(classes), bool)
            if own[class_id]:
                self.grids[class_id] = fit_tail_grid(tests[~part_b & (classes == class_id)])
            combined = self._combined(tests[rows], np.full(rows.sum(), class_id))
            tables.append(RankTable(sorted_ranks(combined[:, None], max(1, len(combined))), [len(combined)]))
        pooled = np.flatnonzero(part_b)[:MAX_FALLBACK_RANKS]
        combined = self._combined(tests[pooled], np.full(len(pooled), num_classes))
        tables.append(RankTable(sorted_ranks(combined[:, None], len(combined)), [len(combined)]))
        self.ranks = RankTable.stacked(*tables)
        self.own = own
        self.target_fpr = target_fpr

    def _combined(self, tests: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return tail_evidence(tests, self.grids[groups]).max(axis=1).astype(np.float32)

    def score(self, tests: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) combined statistics (a ranking) and (n,) bool flags, p < the target rate."""
        groups = np.where(self.own[classes], classes, len(self.own))
        combined = self._combined(tests, groups)
        p_values = interpolated_p_values(self.ranks, groups, combined)
        return combined.astype(np.float64), p_values < self.target_fpr


class FisherVerdict(ExtendedVerdict):
    """The verdict's tests combined by the sum of their tail evidence, -sum ln p_i (Fisher's
    statistic, halved), instead of the largest: evidence spread over several tests adds up.
    The same split, groups, tail models and conformal ranks as :class:`ExtendedVerdict`; fixed
    before any result of it was seen (bench/eval_ood.py states its keep rule)."""

    def _combined(self, tests: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return tail_evidence(tests, self.grids[groups]).sum(axis=1).astype(np.float32)


def own_classes(store) -> np.ndarray:
    """(C,) bool, the classes the store's calibration ranks on their own held-out images."""
    return np.asarray(store.calibration["classes"]["source"]) == OWN
