"""Score alpha vectors against a calibrated store: flags, graded tests, p-values and a verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from explainserve.anomaly.calibration import FALLBACK, check_features, graded_statistics, with_combined
from explainserve.anomaly.conformal import (FEATURE_STATISTICS, FIVE_TESTS, STATISTICS, TESTS, RankTable,
                                            interpolated_p_values, tail_evidence)
from explainserve.anomaly.feature_tests import ARRAY_NAMES as FEATURE_ARRAY_NAMES
from explainserve.anomaly.feature_tests import FEATURE_TESTS, FeatureTests
from explainserve.anomaly.reference import ClassReference, Flags
from explainserve.anomaly.store import REBUILD_HINT, DistributionStore, StoreError
from explainserve.anomaly.summary import NO_EXEMPLAR

NORMAL = "NORMAL"
ANOMALOUS = "ANOMALOUS"
#: Flagged filters a served verdict lists per kind, most extreme first: an input far from the
#: training data can flag most of the filters, and building all of them would cost milliseconds.
MAX_FLAGS = 32
#: One reason code per test, in ``FIVE_TESTS`` order (the alpha tests, then the feature tests).
REASON_CODES = FIVE_TESTS


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


class FeatureShare(NamedTuple):
    """One pooled feature's term of a feature test's statistic.

    Attributes
    ----------
    feature : int
        Channel index at the target layer (the pooled feature's index).
    share : float
        Its term: e_n (P e)_n of feature_mahalanobis's d² (may be negative), or the squared
        residual of feature_residual's r²; a row's terms sum to d² or r²
        (:mod:`explainserve.anomaly.feature_tests`).
    """

    feature: int
    share: float


class Reason(NamedTuple):
    """One test that made a verdict ANOMALOUS.

    ``code`` is one of ``REASON_CODES``; ``value`` the test's statistic (β_z for low_beta);
    ``threshold`` where the test alone would reach a p-value of the target rate (value >
    threshold; value < threshold for low_beta); ``source`` ``"class"`` (the class's own
    calibration images), ``"fallback"`` (the class-independent group) or ``"pooled"`` (a class
    without training images: every calibration image scored against the pooled distribution);
    ``p_value`` the test's own conformal p-value; ``features`` for a feature test, the
    features with the largest terms (:class:`FeatureShare`), largest first, at most
    ``MAX_FLAGS`` (empty for an alpha test).
    """

    code: str
    value: float
    threshold: float
    source: str
    p_value: float
    features: tuple = ()

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
        The combined statistic: -ln of the smallest part-A tail probability of the tests.
        A continuous ranking (ROC curves), which keeps growing past the calibration images.
    feature_mahalanobis, feature_residual : float or None
        The feature tests' statistics (d² and r) when the input was scored with its features.
    smallest_p_value : float
        The smallest ``p_value`` the class's calibration group can give, 1 / (n + 1) for its n
        ranked images: at or above the target rate the verdict is never ANOMALOUS
        (:attr:`Scorer.smallest_p_value`).
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
    smallest_p_value: float
    feature_mahalanobis: float | None = None
    feature_residual: float | None = None


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
        (B, T + 1) float32, the T tests' statistics (``test_names``) and the combined one
        (larger = more anomalous; low_beta's is -β_z): T = 3 for alpha alone (``STATISTICS``
        order), 5 with features (``FIVE_TESTS``, then combined5).
    p_values : np.ndarray
        (B, T + 1) float64 conformal p-values of ``statistics``; the last column is the verdict's.
    critical : np.ndarray
        (B, T + 1) float64, the statistic where each p-value reaches the target rate (+inf: never).
    tests : np.ndarray
        (B, T) bool, the tests given as reasons (see :class:`SampleScore`).
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
    test_names : tuple of str
        The T tests present, in column order: ``TESTS``, or ``FIVE_TESTS`` with features.
    features : np.ndarray or None
        (B, K) float32 pooled features, when scored with them (the feature tests' terms are
        computed per row, for the rows whose reasons name them: :meth:`feature_columns`).
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
    test_names: tuple = TESTS
    features: np.ndarray | None = None

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

    def feature_columns(self, index: int, test: str, max_features: int | None = MAX_FLAGS) -> tuple[list, list]:
        """Row ``index``'s features with the largest terms of feature test ``test``, largest
        first: two lists, feature indices and their terms (at most ``max_features``; None: all).

        Parameters
        ----------
        index : int
        test : str
            One of ``FEATURE_TESTS``; the row must have been scored with features.
        max_features : int, optional
        """
        if self.features is None:
            raise ValueError("feature_columns needs a batch scored with features")
        if test not in FEATURE_TESTS:
            raise ValueError(f"test must be one of {FEATURE_TESTS}, got {test!r}")
        row, tests = self.features[index:index + 1], self.scorer.feature_tests
        if test == "feature_mahalanobis":
            terms = tests.mahalanobis_terms(row, self.classes[index:index + 1])[0]
        else:
            terms = tests.residual_terms(row)[0]
        order = (-terms).argsort(kind="stable")[:max_features]
        return order.tolist(), terms[order].tolist()

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
            code = self.test_names[test]
            if code == "low_beta":  # the statistic is -β_z: report β_z and its bound
                value, threshold = -value, -threshold
            features = (tuple(FeatureShare(*pair) for pair in zip(*self.feature_columns(index, code)))
                        if code in FEATURE_TESTS else ())
            reasons.append(Reason(code, value, threshold, source, float(p_values[test]), features))
        reasons.sort(key=lambda reason: reason.p_value)
        with_features = self.features is not None
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
            smallest_p_value=float(self.scorer.smallest_p_value[class_id]),
            feature_mahalanobis=float(statistics[len(TESTS)]) if with_features else None,
            feature_residual=float(statistics[len(TESTS) + 1]) if with_features else None,
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
        A complete, calibrated store (:func:`~explainserve.anomaly.store.load_store`). When its
        calibration holds the feature block (calibrated with pooled features),
        ``has_feature_tests`` is True and :meth:`score` takes features too.

    Attributes
    ----------
    smallest_p_value : np.ndarray
        (C,) float64, 1 / (n + 1) for the n images each class's calibration group ranks: the
        smallest p-value its verdicts can have. Where it is not below ``target_fpr`` the class
        can never be ANOMALOUS (:func:`~explainserve.anomaly.calibration.classes_never_anomalous`).

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
            self.critical = self._critical_values(per_class["critical"], calibration["fallback"]["critical"])
            self.class_counts = np.asarray(per_class["count"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"distribution store {store.path}: malformed calibration ({error!r}); {REBUILD_HINT}") from None
        if self.from_class.shape != (store.num_classes,) or self.critical.shape != (store.num_classes, len(STATISTICS)):
            raise StoreError(f"distribution store {store.path}: calibration does not cover its {store.num_classes} classes")
        self.tail_grid = np.asarray(store.arrays["tail_grid"])
        self.ranks, self.first_rank_row = self._rank_table(store.arrays["class_ranks"], store.arrays["fallback_ranks"])
        # A p-value is never below 1 / (n + 1) for n ranked images (conformal.interpolated_p_values).
        ranked = np.where(self.from_class, self.class_counts, store.arrays["fallback_ranks"].shape[1])
        self.smallest_p_value = 1.0 / (ranked + 1.0)
        self.feature_tests = None
        if calibration.get("features"):
            self._hold_feature_block(store, calibration["features"])

    def _critical_values(self, per_class: list, fallback: list) -> np.ndarray:
        """(C, S) float64 critical values of a calibration section's groups: a class's own, or
        the fallback's (None in JSON: +inf)."""
        fallback = np.asarray(self._finite(fallback), dtype=np.float64)
        return np.stack([np.asarray(self._finite(c), dtype=np.float64) if c is not None else fallback for c in per_class])

    def _rank_table(self, class_ranks: np.ndarray, fallback_ranks: np.ndarray) -> tuple[RankTable, np.ndarray]:
        """One table of (C, S, L) ``class_ranks`` and (S, n) ``fallback_ranks``: row class * S +
        statistic for the classes ranked on their own, then the fallback's S rows; and (C,) the
        first row of each class."""
        class_ranks, fallback_ranks = np.asarray(class_ranks), np.asarray(fallback_ranks)
        count, num_classes = class_ranks.shape[1], len(self.from_class)
        table = RankTable.stacked(
            RankTable(class_ranks.reshape(-1, class_ranks.shape[-1]),
                      np.repeat(np.where(self.from_class, self.class_counts, 0), count)),
            RankTable(fallback_ranks, np.full(count, fallback_ranks.shape[1])))
        return table, np.where(self.from_class, np.arange(num_classes) * count, num_classes * count)

    def _hold_feature_block(self, store: DistributionStore, section: dict) -> None:
        """The feature tests, the five tests' tail grids, critical values and ranks."""
        arrays = store.arrays
        try:
            critical = self._critical_values(section["classes"]["critical"], section["fallback"]["critical"])
            self.feature_critical = np.concatenate([self.critical[:, :len(TESTS)], critical], axis=1)
            self.feature_tests = FeatureTests.from_arrays({name: arrays[f"feature_{name}"] for name in FEATURE_ARRAY_NAMES})
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"distribution store {store.path}: malformed feature block ({error!r}); {REBUILD_HINT}") from None
        if self.feature_critical.shape != (store.num_classes, len(FIVE_TESTS) + 1):
            raise StoreError(f"distribution store {store.path}: feature block does not cover its {store.num_classes} classes")
        self.feature_tail_grid = np.asarray(arrays["feature_tail_grid"])
        self.feature_ranks, self.first_feature_row = self._rank_table(arrays["feature_class_ranks"],
                                                                      arrays["feature_fallback_ranks"])

    @property
    def has_feature_tests(self) -> bool:
        """True when the store holds the feature block: :meth:`score` then uses features given."""
        return self.feature_tests is not None

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

    def score(self, alpha, classes, features=None) -> BatchScores:
        """Score each row of ``alpha`` against the class in ``classes``.

        Parameters
        ----------
        alpha : array-like
            (B, K) or (K,) float32 Grad-AMap filter scores, computed for the class scored against.
        classes : array-like
            (B,) or scalar int class ids: the predicted class, or the client's label.
        features : array-like, optional
            (B, K) or (K,) float32 pooled features of the same inputs (the target layer's
            activations averaged over positions). With a store that holds the feature block,
            the verdict takes the five tests and its p-value is combined5's; a store without
            it ignores them (``has_feature_tests`` says which).

        Returns
        -------
        BatchScores

        Raises
        ------
        ValueError
            Wrong alpha length, NaN or infinite alpha, unknown class, a class without
            training images; features of the wrong shape, NaN or infinite (named ``features``).
        """
        alpha, classes, row_sums = self.reference.check(alpha, classes)
        stats = self.reference.statistics(alpha, classes, row_sums)
        alpha_tests = graded_statistics(stats)
        if features is None or self.feature_tests is None:
            features, test_names, grids = None, TESTS, self.tail_grid[classes]
            statistics = with_combined(alpha_tests, grids)
            p_values, critical = self.p_values(statistics, classes), self.critical[classes]
        else:
            features = check_features(features, len(alpha), self.store.meta.num_filters)
            test_names, grids = FIVE_TESTS, self.feature_tail_grid[classes]
            feature_statistics = self.feature_tests.statistics(features, classes)
            statistics = with_combined(np.concatenate([alpha_tests, feature_statistics.astype(np.float32)], axis=1), grids)
            p_values, critical = self.five_test_p_values(statistics, classes), self.feature_critical[classes]
        anomalous = p_values[:, -1] < self.target_fpr
        tests = p_values[:, :-1] < self.target_fpr
        # An ANOMALOUS verdict that no single test reaches names the test with the most evidence.
        lone = (anomalous & ~tests.any(axis=1)).nonzero()[0]
        if len(lone):
            strongest = tail_evidence(statistics[lone, :-1], grids[lone]).argmax(axis=1)
            tests[lone, strongest] = True
        return BatchScores(
            scorer=self, alpha=alpha, classes=classes,
            surprise_count=stats.surprise_count, expectation_count=stats.expectation_count,
            beta=stats.beta, beta_percentile=stats.beta_percentile, beta_z=stats.beta_z,
            statistics=statistics, p_values=p_values, critical=critical, tests=tests,
            from_class=self.from_class[classes], anomalous=anomalous, score=statistics[:, -1].astype(np.float64),
            surprising=stats.surprising, expected_missing=stats.expected_missing,
            test_names=test_names, features=features,
        )

    def five_test_p_values(self, statistics: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(B, 6) float64 conformal p-values of (B, 6) five-test ``statistics`` (``FIVE_TESTS``
        and combined5): the alpha tests ranked as without features, the rest in the feature block."""
        alpha_tests = len(TESTS)
        rows = (self.first_feature_row[classes][:, None] + np.arange(len(FEATURE_STATISTICS))).ravel()
        feature_p = interpolated_p_values(self.feature_ranks, rows, statistics[:, alpha_tests:].ravel())
        return np.concatenate([self.p_values(statistics[:, :alpha_tests], classes),
                               feature_p.reshape(len(statistics), -1)], axis=1)
