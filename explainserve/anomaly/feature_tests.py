"""Two tests on the target layer's pooled features, from the same pass as alpha.

The verdict's alpha tests look at one filter at a time, in the scored class's weights; these
two look at the whole vector of pooled features z = mean over positions of the target layer's
activations (one value per filter, K in all):

    feature_mahalanobis:  d² = (z - m_c)^T P (z - m_c)     m_c: mean z of the class scored
                                                           against; P = Σ^+ of the tied
                                                           covariance Σ
    feature_residual:     r  = |(I - U U^T)(z - m)|        m: the mean of z; U: K × min(K//2, R),
                                                           the top principal directions of z - m

the first as Lee et al. 2018 with the scored class (pytorch-ood's ``Mahalanobis`` takes the
nearest class and drops the 1/n of Σ), the second as the residual of ViM (Wang et al. 2022)
centred at the mean of z rather than at -W^+ b, which needs a linear head. Each is a sum of
per-feature terms, which name the features that carry it: d² = sum_n e_n (P e)_n with
e = z - m_c, and r² = sum_n ((I - U U^T)(z - m))_n².

Both are kept at rank at most R = ``FEATURE_RANK``, which bounds what a wide layer costs to
store and to score (a K × K precision at K = 2048 is 33.6 MB and 4.2 M multiply-adds a row).
Σ = V diag(λ) V^T: P keeps Σ's top min(K, R) directions with weights 1/λ_j and, when K > R,
treats the rest as one isotropic part at their mean eigenvalue σ² (as ViM's residual and
PCA-plus-residual distances do):

    P = V_R diag(1/λ_j - 1/σ²) V_R^T + I / σ²          (K > R)
    P = Σ^+ = V diag(1/λ_j) V^T, λ_j above pinv's cutoff  (K <= R: exact)

so d² = sum_j w_j (v_j · e)² + |e|² / σ² costs two K × R products a row, and U has at most R
columns. With K <= R (the demo models: 64-512 filters, R = 128 covers the first two) both
tests are exactly the pseudo-inverse and K // 2 directions.

The statistics are computed in the features' precision. Served and calibrated features are
float32 (:func:`~explainserve.anomaly.calibration.check_features`), so both take float32
copies of the fitted arrays, made once: a float32 product of a batch by a K × R basis takes
less than half the time of a float64 one, and the statistics are ranked as float32 anyway.
Where a statistic is the difference of much larger parts (|e|² / σ² less the top directions'
share when K > R, |z - m|² less |U^T (z - m)|²), float32 loses digits, so such rows are computed
again in float64 (:func:`cancels`). The rounding left (under 1e-5 of d² and r, tested, on
trained networks' features too) moves a conformal p-value only between calibration statistics
that close together. A row's float32 statistics may also differ in the last bits with the batch
it is scored in (BLAS picks its kernels by the row count: d² 1.6e-6 apart relatively on an AMD
EPYC), as the network's own outputs do with the batch it runs in. Float64 features give the
float64 statistics. The per-feature terms,
computed only for a verdict's reasons, are always float64.

Both are fitted on part A of the held-out images (:func:`~explainserve.anomaly.calibration.split_parts`),
never on part B, which ranks them (:mod:`explainserve.anomaly.calibration`).
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import numpy as np

#: The two tests, in the order of every (…, 2) array.
FEATURE_TESTS = ("feature_mahalanobis", "feature_residual")
#: R, the most directions either test keeps (see the module docstring).
FEATURE_RANK = 128
#: How much of a float32 statistic may cancel: a row whose d² or r² is the difference of parts
#: more than this times larger is computed again in float64 (:func:`cancels`). Float32's
#: rounding grows with the ratio (about 3e-6 of d² and 1e-6 of r² per unit on a trained 512-filter
#: layer, whose ratios reach 140 and 900); the synthetic 2048-filter store's stay under 2.
CANCELLATION = 4.0


class ScoringArrays(NamedTuple):
    """The fitted arrays the batch statistics are computed with, all of one precision.

    Attributes
    ----------
    class_means : np.ndarray
        (C, K) m_c.
    centre : np.ndarray
        (K,) m.
    mahalanobis_basis : np.ndarray
        (K, min(K, R)) V_R.
    mahalanobis_weights : np.ndarray
        (min(K, R),) w_j.
    isotropic : float
        1/σ² of the directions past R.
    residual_basis : np.ndarray
        U, or its orthonormal complement W when ``complement``.
    complement : bool
        r² = |W^T (z - m)|² rather than |z - m|² - |U^T (z - m)|².
    """

    class_means: np.ndarray
    centre: np.ndarray
    mahalanobis_basis: np.ndarray
    mahalanobis_weights: np.ndarray
    isotropic: float
    residual_basis: np.ndarray
    complement: bool


class FeatureTests:
    """The Mahalanobis and residual tests on pooled features, fitted on held-out images.

    Parameters
    ----------
    features : np.ndarray
        (n, K) pooled features of the fitting images, n >= 1.
    classes : np.ndarray
        (n,) int, the class each was scored against (predicted as).
    num_classes : int
        C; a class without fitting images takes the mean of all of them.
    shared : np.ndarray, optional
        (C,) bool classes that take the mean of all fitting images whatever they hold (the
        classes without training images, whose alpha is scored against the pool of all classes).

    Attributes
    ----------
    centre : np.ndarray
        (K,) float64 m, the mean of the fitting features.
    class_means : np.ndarray
        (C, K) float64 m_c.
    mahalanobis_basis : np.ndarray
        (K, min(K, R)) float64 V_R, eigenvectors of the tied covariance (1/n) sum (z - m_c)(z - m_c)^T,
        largest eigenvalue first.
    mahalanobis_weights : np.ndarray
        (min(K, R),) float64 w_j: 1/λ_j - 1/σ² (K > R), or 1/λ_j (0 below pinv's cutoff; K <= R).
    isotropic : np.ndarray
        (1,) float64 1/σ² of the directions past R (0 when K <= R or they hold no variance).
    basis : np.ndarray
        (K, min(K // 2, R)) float64 U, eigenvectors of (1/n) sum (z - m)(z - m)^T, largest eigenvalue first.
    """

    def __init__(self, features: np.ndarray, classes: np.ndarray, num_classes: int,
                 shared: np.ndarray | None = None):
        z = np.asarray(features, dtype=np.float64)
        num_features = z.shape[1]
        self.centre = z.mean(axis=0)
        self.class_means = np.repeat(self.centre[None], num_classes, axis=0)
        for class_id in np.unique(classes):
            self.class_means[class_id] = z[classes == class_id].mean(axis=0)
        deviation = z - self.class_means[classes]
        eigenvalues, eigenvectors = np.linalg.eigh(deviation.T @ deviation / len(z))
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # largest first
        rank = min(num_features, FEATURE_RANK)
        # numpy's pinv cutoff (rtol = K eps of the largest), so that K <= R is exactly Σ^+.
        cutoff = num_features * np.finfo(np.float64).eps * np.abs(eigenvalues).max(initial=0.0)
        kept = eigenvalues[:rank]
        inverse = np.where(np.abs(kept) > cutoff, 1 / np.where(np.abs(kept) > cutoff, kept, 1.0), 0.0)
        rest = eigenvalues[rank:].mean() if rank < num_features else 0.0
        isotropic = 1 / rest if rest > cutoff else 0.0
        self.mahalanobis_basis = eigenvectors[:, :rank]
        self.mahalanobis_weights = np.where(inverse != 0, inverse - isotropic, 0.0)
        self.isotropic = np.array([isotropic])
        if shared is not None:  # after the covariance, which keeps each class's own spread
            self.class_means[np.asarray(shared, dtype=bool)] = self.centre
        centred = z - self.centre
        _, eigenvectors = np.linalg.eigh(centred.T @ centred / len(z))  # ascending
        self.basis = eigenvectors[:, ::-1][:, : min(num_features // 2, FEATURE_RANK)]

    @property
    def num_features(self) -> int:
        """K, the length of every feature vector."""
        return len(self.centre)

    @property
    def precision(self) -> np.ndarray:
        """(K, K) float64 P, built from the kept directions (for inspection: scoring never forms it)."""
        basis = self.mahalanobis_basis
        return (basis * self.mahalanobis_weights) @ basis.T + self.isotropic[0] * np.eye(self.num_features)

    def arrays(self) -> dict:
        """The fitted state as float64 arrays: ``centre`` (K,), ``class_means`` (C, K),
        ``mahalanobis_basis`` (K, min(K, R)), ``mahalanobis_weights`` (min(K, R),), ``isotropic``
        (1,), ``basis`` (K, min(K // 2, R))."""
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "FeatureTests":
        """The tests as fitted, from :meth:`arrays` (a store's, read-only arrays are fine)."""
        tests = cls.__new__(cls)
        for name in ARRAY_NAMES:
            setattr(tests, name, np.asarray(arrays[name], dtype=np.float64))
        return tests

    def mahalanobis_terms(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Each feature's term of d².

        Parameters
        ----------
        features : np.ndarray
            (B, K) pooled features.
        classes : np.ndarray
            (B,) int class each row is scored against.

        Returns
        -------
        np.ndarray
            (B, K) float64 e_n (P e)_n, e = z - m_c; a row sums to d² (terms may be negative).
        """
        deviation = np.asarray(features, dtype=np.float64) - self.class_means[classes]
        weighted = (deviation @ self.mahalanobis_basis) * self.mahalanobis_weights
        return deviation * (weighted @ self.mahalanobis_basis.T + self.isotropic[0] * deviation)

    @cached_property
    def single_precision(self) -> ScoringArrays | None:
        """The fitted arrays float32 features are scored with, as contiguous float32 (made on
        first use); the residual's basis is the orthonormal complement of U when that has no
        more columns than U (K <= 2 R, K even): r² = |W^T (z - m)|², free of the cancellation
        in |z - m|² - |U^T (z - m)|², which float32 cannot afford when U holds nearly all of
        the variance. None when a weight is past 1 / float32's smallest normal number (a
        direction's variance below it: features in units around 1e-19 or smaller), which
        float32 cannot score."""
        if max(np.abs(self.mahalanobis_weights).max(initial=0.0), self.isotropic[0]) > 1 / np.finfo(np.float32).tiny:
            return None
        rank = self.basis.shape[1]
        complement = self.num_features - rank <= rank
        residual_basis = np.linalg.qr(self.basis, mode="complete")[0][:, rank:] if complement else self.basis
        return ScoringArrays(*(np.ascontiguousarray(array, dtype=np.float32) for array in (
            self.class_means, self.centre, self.mahalanobis_basis, self.mahalanobis_weights, self.isotropic[0],
            residual_basis)), complement)

    def scoring_arrays(self, features: np.ndarray) -> tuple[np.ndarray, ScoringArrays]:
        """``features`` and the fitted arrays in the precision the statistics take: float32 for
        float32 features (:attr:`single_precision`, unless None), otherwise float64 (the
        residual through U itself)."""
        features = np.asarray(features)
        if features.dtype == np.float32 and self.single_precision is not None:
            return features, self.single_precision
        return features.astype(np.float64), ScoringArrays(self.class_means, self.centre, self.mahalanobis_basis,
                                                          self.mahalanobis_weights, self.isotropic[0], self.basis,
                                                          False)

    def squared_distances(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(B,) d², the sum of :meth:`mahalanobis_terms` at a fraction of the cost (one
        K × min(K, R) product a row), which is what scoring a batch needs; float32 for float32
        features, else float64 (:meth:`scoring_arrays`; rows float32 would cancel in, again in
        float64: :func:`cancels`)."""
        features, fitted = self.scoring_arrays(features)
        deviation = fitted.class_means.take(classes, axis=0)
        np.subtract(features, deviation, out=deviation)  # in place: no second (B, K) array
        distance = np.square(deviation @ fitted.mahalanobis_basis) @ fitted.mahalanobis_weights
        if fitted.isotropic:  # the directions past R (K > R), whose weights the top R's subtract from
            spread = fitted.isotropic * np.vecdot(deviation, deviation)
            distance += spread
            again = np.flatnonzero(cancels(distance, spread))
            if len(again):
                distance[again] = self.squared_distances(features[again].astype(np.float64), np.asarray(classes)[again])
        return distance

    def residual_terms(self, features: np.ndarray) -> np.ndarray:
        """Each feature's term of r².

        Parameters
        ----------
        features : np.ndarray
            (B, K) pooled features.

        Returns
        -------
        np.ndarray
            (B, K) float64 ((I - U U^T)(z - m))_n², >= 0; a row sums to r².
        """
        centred = np.asarray(features, dtype=np.float64) - self.centre
        return (centred - (centred @ self.basis) @ self.basis.T) ** 2

    def squared_residuals(self, features: np.ndarray) -> np.ndarray:
        """(B,) r² = |z - m|² - |U^T (z - m)|², >= 0: the sum of :meth:`residual_terms` at half
        the cost (U's columns are orthonormal), which is what scoring a batch needs; float32 for
        float32 features, else float64 (:meth:`scoring_arrays`; rows float32 would cancel in,
        again in float64: :func:`cancels`)."""
        features, fitted = self.scoring_arrays(features)
        centred = features - fitted.centre
        projected = centred @ fitted.residual_basis
        if fitted.complement:  # the basis spans the residual's directions
            return np.vecdot(projected, projected)
        total = np.vecdot(centred, centred)
        residual = np.maximum(total - np.vecdot(projected, projected), 0)
        again = np.flatnonzero(cancels(residual, total))
        if len(again):
            residual[again] = self.squared_residuals(features[again].astype(np.float64))
        return residual

    def statistics(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(B, 2) d² and r in ``FEATURE_TESTS`` order, larger = further from the fitting images:
        float32 for float32 features (as served and calibrated), else float64 (:meth:`scoring_arrays`)."""
        return np.column_stack([self.squared_distances(features, classes), np.sqrt(self.squared_residuals(features))])


def cancels(result: np.ndarray, cancelled: np.ndarray) -> np.ndarray:
    """(B,) bool, the float32 rows whose ``cancelled`` part (|z - m|² of r², |e|² / σ² of d²)
    exceeds ``CANCELLATION`` times the ``result`` (B,): the others' float32 rounding stays under
    about 1e-5 of it; float64 results: none."""
    return (cancelled > CANCELLATION * result) & (result.dtype == np.float32)


#: What :meth:`FeatureTests.arrays` holds, in order.
ARRAY_NAMES = ("centre", "class_means", "mahalanobis_basis", "mahalanobis_weights", "isotropic", "basis")
