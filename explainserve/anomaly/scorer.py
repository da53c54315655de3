"""Score alpha vectors against a calibrated store: flags, graded tests, p-values and a verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from explainserve.anomaly.calibration import FALLBACK, graded_statistics, with_combined
from explainserve.anomaly.conformal import (STATISTICS, TESTS, RankTable, interpolated_p_values,
                                            tail_evidence)
from explainserve.anomaly.reference import ClassReference, Flags
from explainserve.anomaly.store import REBUILD_HINT, DistributionStore, StoreError
from explainserve.anomaly.summary import NO_EXEMPLAR

NORMAL = "NORMAL"
ANOMALOUS = "ANOMALOUS"
#: Flagged filters a served verdict lists per kind, most extreme first: an input far from the
#: training data can flag most of the filters, and building all of them would cost milliseconds.
MAX_FLAGS = 32
#: One reason code per test, in ``TESTS`` order.
REASON_CODES = TESTS


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
    exceedance : float
        |alpha - threshold| / s_cn, in robust units of the (class, filter): this filter's
        term of the surprise or missing statistic.
    """

    filter: int
    alpha: float
    threshold: float
    exemplars: tuple
    exceedance: float


class Reason(NamedTuple):
    """One test that made a verdict ANOMALOUS.

    ``code`` is one of ``REASON_CODES``; ``value`` the test's statistic (β_z for low_beta);
    ``threshold`` where the test alone would reach a p-value of the target rate (value >
    threshold; value < threshold for low_beta); ``source`` ``"class"`` (the class's own
    calibration images), ``"fallback"`` (the class-independent group) or ``"pooled"`` (a class
    without training images: every calibration image scored against the pooled distribution);
    ``p_value`` the test's own conformal p-value.
    """

    code: str
    value: float
    threshold: float
    source: str
    p_value: float

    def __str__(self) -> str:
        relation = "<" if self.code == "low_beta" else ">"
        name = "beta_z" if self.code == "low_beta" else self.code
        return f"{name} {self.value:g} {relation} {self.threshold:g}, p = {self.p_value:.3g} ({self.source} calibration)"


@dataclass(frozen=True)
class SampleScore:
    """One input scored against one class.

    Attributes
    ----------
    class_id : int
    class_name : str
    surprising : tuple of FilterFlag
        Sorted by exceedance, largest first: ``surprising[0]`` is the most surprising.
    expected_missing : tuple of FilterFlag
        Sorted by exceedance, largest first.
    surprise, missing : float
        The graded statistics (sums of the exceedances).
    beta : float
    beta_percentile : float
        In [0, 100], within the class's training β.
    beta_z : float
    verdict : str
        ``NORMAL`` or ``ANOMALOUS``: ANOMALOUS exactly when ``p_value`` < the target rate.
    p_value : float
        The verdict's conformal p-value, in (0, 1].
    reasons : tuple of Reason
        Empty when NORMAL; otherwise the tests whose own p-value is below the target rate,
        smallest first, or the test with the most tail evidence when none is.
    score : float
        The combined statistic: -ln of the smallest part-A tail probability of the three tests.
        A continuous ranking (ROC curves), which keeps growing past the calibration images.
    """

    class_id: int
    class_name: str
    surprising: tuple
    expected_missing: tuple
    surprise: float
    missing: float
    beta: float
    beta_percentile: float
    beta_z: float
    verdict: str
    p_value: float
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
        (B,) int64 flagged filters.
    beta, beta_percentile, beta_z : np.ndarray
        (B,) float64.
    statistics : np.ndarray
        (B, 4) float32, the tests' statistics and the combined one, in ``STATISTICS`` order
        (larger = more anomalous; low_beta's is -β_z).
    p_values : np.ndarray
        (B, 4) float64 conformal p-values of ``statistics``; column 3 is the verdict's.
    critical : np.ndarray
        (B, 4) float64, the statistic where each p-value reaches the target rate (+inf: never).
    tests : np.ndarray
        (B, 3) bool, the tests given as reasons (see :class:`SampleScore`).
    from_class : np.ndarray
        (B,) bool, True when the class's own row of ranks was used (its own images, or the
        pooled group for a class without training images), False for the fallback.
    anomalous : np.ndarray
        (B,) bool, p_value < target rate.
    score : np.ndarray
        (B,) float64, the combined statistic.
    surprising, expected_missing : Flags
        The flagged filters of every row and their exceedances, sparse
        (:class:`~explainserve.anomaly.reference.Flags`; ``.mask()`` gives the (B, K) bool mask).
    """

    scorer: "Scorer"
    alpha: np.ndarray
    classes: np.ndarray
    surprise_count: np.ndarray
    expectation_count: np.ndarray
    beta: np.ndarray
    beta_percentile: np.ndarray
    beta_z: np.ndarray
    statistics: np.ndarray
    p_values: np.ndarray
    critical: np.ndarray
    tests: np.ndarray
    from_class: np.ndarray
    anomalous: np.ndarray
    score: np.ndarray
    surprising: Flags
    expected_missing: Flags

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def p_value(self) -> np.ndarray:
        """(B,) float64, the verdict's p-values."""
        return self.p_values[:, -1]

    def flag_columns(self, index: int, kind: str, max_flags: int | None = None) -> tuple[list, list, list, list, list]:
        """Row ``index``'s flags of one kind, most extreme first (the ``max_flags`` first), as the
        columns of :class:`FilterFlag`: five lists of filters, alphas, thresholds, exemplar-id
        lists (a class's padding ids left out) and exceedances.

        Parameters
        ----------
        index : int
        kind : str
            ``"surprising"`` or ``"expected_missing"``.
        max_flags : int, optional
        """
        reference = self.scorer.reference
        if kind == "surprising":
            found, thresholds = self.surprising, reference.p_high
        elif kind == "expected_missing":
            found, thresholds = self.expected_missing, reference.p_low
        else:
            raise ValueError(f"kind must be 'surprising' or 'expected_missing', got {kind!r}")
        class_id = int(self.classes[index])
        exceedance = found.row_exceedance(index)
        order = (-exceedance).argsort(kind="stable")[:max_flags]
        filters = found.filters(index)[order]
        exemplars = reference.exemplars[class_id][filters].tolist()
        if reference.counts[class_id] < reference.exemplars.shape[-1]:  # padded with NO_EXEMPLAR
            exemplars = [[i for i in ids if i != NO_EXEMPLAR] for ids in exemplars]
        return (filters.tolist(), self.alpha[index][filters].tolist(),
                thresholds[class_id][filters].tolist(), exemplars, exceedance[order].tolist())

    def sample(self, index: int, max_flags: int | None = None) -> SampleScore:
        """The full result for row ``index``; with ``max_flags``, only the ``max_flags`` most
        extreme filters of each flag list (the counts stay in ``surprise_count`` /
        ``expectation_count``; 0 builds none)."""
        class_id = int(self.classes[index])
        reference = self.scorer.reference

        def flags(kind: str) -> tuple:
            if max_flags == 0:
                return ()
            return tuple(FilterFlag(f, a, t, tuple(ids), e) for f, a, t, ids, e in zip(*self.flag_columns(index, kind, max_flags)))

        source = str(self.scorer.sources[class_id])
        statistics, critical, p_values = self.statistics[index], self.critical[index], self.p_values[index]
        reasons = []
        for test in np.flatnonzero(self.tests[index]):
            value, threshold = float(statistics[test]), float(critical[test])
            if REASON_CODES[test] == "low_beta":  # the statistic is -β_z: report β_z and its bound
                value, threshold = -value, -threshold
            reasons.append(Reason(REASON_CODES[test], value, threshold, source, float(p_values[test])))
        reasons.sort(key=lambda reason: reason.p_value)
        return SampleScore(
            class_id=class_id,
            class_name=reference.store.meta.class_names[class_id],
            surprising=flags("surprising"),
            expected_missing=flags("expected_missing"),
            surprise=float(statistics[0]),
            missing=float(statistics[1]),
            beta=float(self.beta[index]),
            beta_percentile=float(self.beta_percentile[index]),
            beta_z=float(self.beta_z[index]),
            verdict=ANOMALOUS if self.anomalous[index] else NORMAL,
            p_value=float(p_values[-1]),
            reasons=tuple(reasons),
            score=float(self.score[index]),
        )

    def samples(self) -> list:
        return [self.sample(index) for index in range(len(self))]


def region_flag(surprising: Sequence):
    """The flag whose surprise region is shown: the first of ``surprising`` with a non-zero alpha.

    Parameters
    ----------
    surprising : sequence of FilterFlag (or the API's FilterFlag messages)
        A verdict's surprising filters as served: most surprising (largest exceedance) first,
        at most ``MAX_FLAGS``.

    Returns
    -------
    The flag, or None. A filter whose score is exactly 0 has zero activation (or zero
    gradient) everywhere, so no pixel acts through it and its region map would be blank; it
    can still be surprising when its training scores are all negative.
    """
    return next((flag for flag in surprising if flag.alpha != 0), None)


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
            self.target_fpr = float(calibration["target_fpr"])
            per_class = calibration["classes"]
            self.sources = np.asarray(per_class["source"])  # "class", "pooled" or "fallback"
            self.from_class = self.sources != FALLBACK  # ranked in the class's own row of class_ranks
            fallback = np.asarray(self._finite(calibration["fallback"]["critical"]), dtype=np.float64)
            self.critical = np.stack([np.asarray(self._finite(c), dtype=np.float64) if c is not None else fallback
                                      for c in per_class["critical"]])
            self.class_counts = np.asarray(per_class["count"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"distribution store {store.path}: malformed calibration ({error!r}); {REBUILD_HINT}") from None
        if self.from_class.shape != (store.num_classes,) or self.critical.shape != (store.num_classes, len(STATISTICS)):
            raise StoreError(f"distribution store {store.path}: calibration does not cover its {store.num_classes} classes")
        num_statistics = len(STATISTICS)
        self.tail_grid = np.asarray(store.arrays["tail_grid"])
        class_ranks = np.asarray(store.arrays["class_ranks"])
        fallback_ranks = np.asarray(store.arrays["fallback_ranks"])
        # One table: row class * 4 + statistic for the classes ranked on their own, then the
        # fallback's four rows.
        self.ranks = RankTable.stacked(
            RankTable(class_ranks.reshape(-1, class_ranks.shape[-1]),
                      np.repeat(np.where(self.from_class, self.class_counts, 0), num_statistics)),
            RankTable(fallback_ranks, np.full(num_statistics, fallback_ranks.shape[1])))
        self.first_rank_row = np.where(self.from_class, np.arange(store.num_classes) * num_statistics,
                                       store.num_classes * num_statistics)

    @staticmethod
    def _finite(values: list) -> list:
        return [np.inf if value is None else value for value in values]

    @property
    def store(self) -> DistributionStore:
        return self.reference.store

    def p_values(self, statistics: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(B, 4) float64 conformal p-values of (B, 4) ``statistics`` scored against ``classes``."""
        rows = (self.first_rank_row[classes][:, None] + np.arange(statistics.shape[1])).ravel()
        return interpolated_p_values(self.ranks, rows, statistics.ravel()).reshape(statistics.shape)

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
        alpha, classes, row_sums = self.reference.check(alpha, classes)
        stats = self.reference.statistics(alpha, classes, row_sums)
        statistics = with_combined(graded_statistics(stats), self.tail_grid[classes])
        p_values = self.p_values(statistics, classes)
        anomalous = p_values[:, -1] < self.target_fpr
        tests = p_values[:, :-1] < self.target_fpr
        # An ANOMALOUS verdict that no single test reaches names the test with the most evidence.
        lone = (anomalous & ~tests.any(axis=1)).nonzero()[0]
        if len(lone):
            strongest = tail_evidence(statistics[lone, :-1], self.tail_grid[classes[lone]]).argmax(axis=1)
            tests[lone, strongest] = True
        return BatchScores(
            scorer=self, alpha=alpha, classes=classes,
            surprise_count=stats.surprise_count, expectation_count=stats.expectation_count,
            beta=stats.beta, beta_percentile=stats.beta_percentile, beta_z=stats.beta_z,
            statistics=statistics, p_values=p_values, critical=self.critical[classes], tests=tests,
            from_class=self.from_class[classes], anomalous=anomalous, score=statistics[:, -1].astype(np.float64),
            surprising=stats.surprising, expected_missing=stats.expected_missing,
        )
