"""Two tests on the target layer's pooled features, from the same pass as alpha.

The verdict's alpha tests look at one filter at a time, in the scored class's weights; these
two look at the whole vector of pooled features z = mean over positions of the target layer's
activations (one value per filter, K in all):

    feature_mahalanobis:  d² = (z - m_c)^T P (z - m_c)     m_c: mean z of the class scored
                                                           against; P = Σ^+ of the tied
                                                           covariance Σ
    feature_residual:     r  = |(I - U U^T)(z - m)|        m: the mean of z; U: K × K//2, the
                                                           top principal directions of z - m

the first as Lee et al. 2018 with the scored class (pytorch-ood's ``Mahalanobis`` takes the
nearest class and drops the 1/n of Σ), the second as the residual of ViM (Wang et al. 2022)
centred at the mean of z rather than at -W^+ b, which needs a linear head. Each is a sum of
per-feature terms, which name the features that carry it: d² = sum_n e_n (P e)_n with
e = z - m_c, and r² = sum_n ((I - U U^T)(z - m))_n².

Both are fitted on part A of the held-out images (:func:`~explainserve.anomaly.calibration.split_parts`),
never on part B, which ranks them (:mod:`explainserve.anomaly.calibration`).
"""

from __future__ import annotations

import numpy as np

#: The two tests, in the order of every (…, 2) array.
FEATURE_TESTS = ("feature_mahalanobis", "feature_residual")


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
    precision : np.ndarray
        (K, K) float64 P, the pseudo-inverse of the tied covariance (1/n) sum (z - m_c)(z - m_c)^T.
    basis : np.ndarray
        (K, K // 2) float64 U, eigenvectors of (1/n) sum (z - m)(z - m)^T, largest eigenvalue first.
    """

    def __init__(self, features: np.ndarray, classes: np.ndarray, num_classes: int,
                 shared: np.ndarray | None = None):
        z = np.asarray(features, dtype=np.float64)
        self.centre = z.mean(axis=0)
        self.class_means = np.repeat(self.centre[None], num_classes, axis=0)
        for class_id in np.unique(classes):
            self.class_means[class_id] = z[classes == class_id].mean(axis=0)
        deviation = z - self.class_means[classes]
        self.precision = np.linalg.pinv(deviation.T @ deviation / len(z), hermitian=True)
        if shared is not None:  # after the covariance, which keeps each class's own spread
            self.class_means[np.asarray(shared, dtype=bool)] = self.centre
        centred = z - self.centre
        _, eigenvectors = np.linalg.eigh(centred.T @ centred / len(z))  # ascending
        self.basis = eigenvectors[:, ::-1][:, : z.shape[1] // 2]

    @property
    def num_features(self) -> int:
        """K, the length of every feature vector."""
        return len(self.centre)

    def arrays(self) -> dict:
        """The fitted state as float64 arrays: ``centre`` (K,), ``class_means`` (C, K),
        ``precision`` (K, K), ``basis`` (K, K // 2)."""
        return {"centre": self.centre, "class_means": self.class_means, "precision": self.precision,
                "basis": self.basis}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "FeatureTests":
        """The tests as fitted, from :meth:`arrays` (a store's, read-only arrays are fine)."""
        tests = cls.__new__(cls)
        for name in ("centre", "class_means", "precision", "basis"):
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
        return deviation * (deviation @ self.precision)

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
        """(B,) float64 r² = |z - m|² - |U^T (z - m)|², >= 0: the sum of :meth:`residual_terms`
        at half the cost (U's columns are orthonormal), which is what scoring a batch needs."""
        centred = np.asarray(features, dtype=np.float64) - self.centre
        projected = centred @ self.basis
        return np.maximum(np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", projected, projected), 0.0)

    def statistics_and_terms(self, features: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 2) float64 d² and r in ``FEATURE_TESTS`` order, larger = further from the fitting
        images, and the (B, K) :meth:`mahalanobis_terms` they were summed from."""
        terms = self.mahalanobis_terms(features, classes)
        return np.column_stack([terms.sum(axis=1), np.sqrt(self.squared_residuals(features))]), terms

    def statistics(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(B, 2) float64 d² and r in ``FEATURE_TESTS`` order, larger = further from the fitting images."""
        return self.statistics_and_terms(features, classes)[0]
