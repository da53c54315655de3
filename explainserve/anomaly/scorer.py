"""Score alpha vectors against a calibrated store: flags, β and a NORMAL / ANOMALOUS verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from explainserve.anomaly.reference import ClassReference
from explainserve.anomaly.store import DistributionStore, StoreError
from explainserve.anomaly.summary import NO_EXEMPLAR

NORMAL = "NORMAL"
ANOMALOUS = "ANOMALOUS"
REASON_CODES = ("surprise_count", "expectation_count", "low_beta")


class FilterFlag(NamedTuple):
    """One flagged filter (a NamedTuple: cheap to build by the hundred).

    Attributes
    ----------
    filter : int
        Channel index at the target layer.
    alpha : float
        Its Grad-AMap score.
    threshold : float
        P99.9_cn for a surprising filter, P0.1_cn for an expected-but-missing one.
    exemplars : tuple of int
        Ids of the training images of the class with the highest alpha for this filter.
    """

    filter: int
    alpha: float
    threshold: float
    exemplars: tuple


class Reason(NamedTuple):
    """Why a verdict is ANOMALOUS: ``code`` is one of ``REASON_CODES``; ``source`` is
    ``"class"`` (the class's own thresholds) or ``"fallback"`` (class-independent)."""

    code: str
    value: float
    threshold: float
    source: str

    def __str__(self) -> str:
        relation = "<" if self.code == "low_beta" else ">"
        name = "beta_z" if self.code == "low_beta" else self.code.replace("_", " ")
        return f"{name} {self.value:g} {relation} {self.threshold:g} ({self.source} threshold)"


@dataclass(frozen=True)
class SampleScore:
    """One input scored against one class.

    Attributes
    ----------
    class_id : int
    class_name : str
    surprising : tuple of FilterFlag
        Sorted by alpha - threshold, largest first: ``surprising[0]`` is the most surprising.
    expected_missing : tuple of FilterFlag
        Sorted by threshold - alpha, largest first.
    beta : float
    beta_percentile : float
        In [0, 100], within the class's training β.
    beta_z : float
    verdict : str
        ``NORMAL`` or ``ANOMALOUS``.
    reasons : tuple of Reason
        Empty when NORMAL.
    score : float
        max(surprise_count - t_s, expectation_count - t_e, t_β - β_z): the margin past the
        nearest threshold; positive exactly when ANOMALOUS. A continuous score for ROC curves.
    """

    class_id: int
    class_name: str
    surprising: tuple
    expected_missing: tuple
    beta: float
    beta_percentile: float
    beta_z: float
    verdict: str
    reasons: tuple
    score: float


@dataclass(frozen=True)
class BatchScores:
    """Scores of B inputs as arrays; :meth:`sample` builds the per-input object.

    Attributes
    ----------
    alpha : np.ndarray
        (B, K) float32 input.
    classes : np.ndarray
        (B,) int64 class each row was scored against.
    surprise_count, expectation_count : np.ndarray
        (B,) int64.
    beta, beta_percentile, beta_z : np.ndarray
        (B,) float64.
    tests : np.ndarray
        (B, 3) bool, which test fired, in ``REASON_CODES`` order.
    thresholds : np.ndarray
        (B, 3) float64, the thresholds applied.
    from_class : np.ndarray
        (B,) bool, True when the class's own thresholds were used, False for the fallback.
    anomalous : np.ndarray
        (B,) bool.
    score : np.ndarray
        (B,) float64, see :class:`SampleScore`.
    surprising, expected_missing : np.ndarray
        (B, K) bool masks.
    """

    scorer: "Scorer"
    alpha: np.ndarray
    classes: np.ndarray
    surprise_count: np.ndarray
    expectation_count: np.ndarray
    beta: np.ndarray
    beta_percentile: np.ndarray
    beta_z: np.ndarray
    tests: np.ndarray
    thresholds: np.ndarray
    from_class: np.ndarray
    anomalous: np.ndarray
    score: np.ndarray
    surprising: np.ndarray
    expected_missing: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, index: int, max_flags: int | None = None) -> SampleScore:
        """The full result for row ``index``; with ``max_flags``, only the ``max_flags`` most
        extreme filters of each flag list (the counts stay in ``surprise_count`` /
        ``expectation_count``)."""
        class_id = int(self.classes[index])
        reference = self.scorer.reference
        row = self.alpha[index]
        padded = reference.counts[class_id] < reference.exemplars.shape[-1]

        def flags(mask: np.ndarray, thresholds: np.ndarray, sign: float) -> tuple:
            filters = np.flatnonzero(mask)
            excess = sign * (row[filters] - thresholds[filters])
            filters = filters[np.argsort(-excess, kind="stable")[:max_flags]]
            columns = zip(filters.tolist(), row[filters].tolist(), thresholds[filters].tolist(),
                          reference.exemplars[class_id][filters].tolist())
            if padded:
                return tuple(FilterFlag(f, a, t, tuple(i for i in ids if i != NO_EXEMPLAR)) for f, a, t, ids in columns)
            return tuple(FilterFlag(f, a, t, tuple(ids)) for f, a, t, ids in columns)

        source = "class" if self.from_class[index] else "fallback"
        values = (self.surprise_count[index], self.expectation_count[index], self.beta_z[index])
        reasons = tuple(
            Reason(code, float(value), float(threshold), source)
            for code, value, threshold, fired in zip(REASON_CODES, values, self.thresholds[index], self.tests[index])
            if fired
        )
        return SampleScore(
            class_id=class_id,
            class_name=reference.store.meta.class_names[class_id],
            surprising=flags(self.surprising[index], reference.p_high[class_id], 1.0),
            expected_missing=flags(self.expected_missing[index], reference.p_low[class_id], -1.0),
            beta=float(self.beta[index]),
            beta_percentile=float(self.beta_percentile[index]),
            beta_z=float(self.beta_z[index]),
            verdict=ANOMALOUS if self.anomalous[index] else NORMAL,
            reasons=reasons,
            score=float(self.score[index]),
        )

    def samples(self) -> list:
        return [self.sample(index) for index in range(len(self))]


class Scorer:
    """Scores alpha vectors against a calibrated store, vectorised over a batch.

    Parameters
    ----------
    store : DistributionStore
        A complete, calibrated store (:func:`~explainserve.anomaly.store.load_store`).

    Raises
    ------
    StoreError
        If the store is a shard or is not calibrated.
    """

    def __init__(self, store: DistributionStore):
        calibration = store.calibration
        if calibration is None:
            raise StoreError(f"distribution store {store.path} is not calibrated; run build-distributions with a validation split")
        try:
            self.reference = ClassReference(store)
        except ValueError as error:
            raise StoreError(str(error)) from None
        try:
            per_class = calibration["classes"]
            self.thresholds = np.stack(
                [np.asarray(per_class[name], dtype=np.float64) for name in ("surprise", "expectation", "beta_z")], axis=1
            )
            self.from_class = np.asarray(per_class["source"]) == "class"
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"distribution store {store.path}: malformed calibration ({error!r})") from None
        if self.thresholds.shape != (store.num_classes, 3) or self.from_class.shape != (store.num_classes,):
            raise StoreError(f"distribution store {store.path}: calibration does not cover its {store.num_classes} classes")

    @property
    def store(self) -> DistributionStore:
        return self.reference.store

    def score(self, alpha, classes) -> BatchScores:
        """Score each row of ``alpha`` against the class in ``classes``.

        Parameters
        ----------
        alpha : array-like
            (B, K) or (K,) float32 Grad-AMap filter scores, computed for the class scored against.
        classes : array-like
            (B,) or scalar int class ids: the predicted class, or the client's label.

        Returns
        -------
        BatchScores

        Raises
        ------
        ValueError
            Wrong alpha length, NaN or infinite alpha, unknown class, or a class without
            training images.
        """
        alpha, classes = self.reference.check(alpha, classes)
        stats = self.reference.statistics(alpha, classes)
        thresholds = self.thresholds[classes]
        values = np.stack([stats.surprise_count, stats.expectation_count, stats.beta_z], axis=1)
        margins = np.concatenate([values[:, :2] - thresholds[:, :2], thresholds[:, 2:] - values[:, 2:]], axis=1)
        tests = margins > 0  # same tests as calibration's union_flags: s > t_s, e > t_e, beta_z < t_beta
        return BatchScores(
            scorer=self, alpha=alpha, classes=classes,
            surprise_count=stats.surprise_count, expectation_count=stats.expectation_count,
            beta=stats.beta, beta_percentile=stats.beta_percentile, beta_z=stats.beta_z,
            tests=tests, thresholds=thresholds, from_class=self.from_class[classes],
            anomalous=tests.any(axis=1), score=margins.max(axis=1),
            surprising=stats.surprising, expected_missing=stats.expected_missing,
        )
