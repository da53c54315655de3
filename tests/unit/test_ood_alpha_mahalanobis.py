"""bench/ood_alpha_mahalanobis.py: the alpha-space Mahalanobis test, by hand and against pytorch-ood."""

import numpy as np
import pytest
import torch

from bench.ood_alpha_mahalanobis import AlphaMahalanobis


def test_a_hand_computed_diagonal_case_and_its_filter_terms():
    # Two classes, three filters, scales 1 and 2: e = (alpha - mu) / s. The fitting deviations
    # are ±(1, 0, 0), ±(0, 2, 0), ±(0, 0, 3) (after scaling), so E[e e^T] = diag(1/3, 4/3, 9/3):
    # rank 2 keeps filters 2 and 1 (eigenvalues 3 and 4/3); the residual is filter 0's 1/3.
    mean = np.array([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])
    scale = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    steps = np.array([[1, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 3], [0, 0, -3]], dtype=float)
    alpha = np.concatenate([steps, 10 + 2 * steps])
    classes = np.repeat([0, 1], 6)
    test = AlphaMahalanobis(mean, scale, alpha, classes, rank=2)
    np.testing.assert_allclose(sorted(test.eigenvalues), [4 / 3, 3.0])
    assert test.residual == pytest.approx(1 / 3)
    # alpha (1, 1, 1) against class 0: e = (1, 1, 1) -> 1 / (1/3) + 1 / (4/3) + 1 / 3 = 3 + 0.75 + 0.333...
    # the same deviation against class 1 is alpha 10 + 2 * (1, 1, 1).
    probe = np.array([[1.0, 1.0, 1.0], [12.0, 12.0, 12.0]])
    expected = 3 + 0.75 + 1 / 3
    np.testing.assert_allclose(test.distance(probe, np.array([0, 1])), [expected, expected])
    terms = test.filter_terms(probe, np.array([0, 1]))
    np.testing.assert_allclose(terms, [[3, 0.75, 1 / 3]] * 2, atol=1e-12)
    # Filter 0 (the low-variance one) carries the distance: it is the filter the test names.
    assert terms[0].argmax() == 0


@pytest.mark.slow  # importing pytorch-ood takes seconds
@pytest.mark.parametrize("num_filters", [6, 24])
def test_at_full_rank_it_is_pytorch_ood_mahalanobis_up_to_its_unnormalised_covariance(num_filters):
    """With the class means of the fitting data as mu, unit scales and rank K - 1 (the residual is
    then the last eigenvalue alone, so the inverse is exact), d² is pytorch-ood's Mahalanobis
    score (0.5 (z - mu_c)^T (sum of centred outer products)^-1 (z - mu_c), nearest class) x 2n."""
    from pytorch_ood.detector import Mahalanobis

    rng = np.random.default_rng(num_filters)
    n, classes_n = 400, 3
    classes = np.arange(n) % classes_n
    mixing = rng.standard_normal((num_filters, num_filters))
    alpha = rng.standard_normal((n, num_filters)) @ mixing + 3 * rng.standard_normal((classes_n, num_filters))[classes]
    mean = np.stack([alpha[classes == c].mean(axis=0) for c in range(classes_n)])
    test = AlphaMahalanobis(mean, np.ones_like(mean), alpha, classes, rank=num_filters - 1)
    reference = Mahalanobis(None).fit_features(torch.tensor(alpha, dtype=torch.float32), torch.tensor(classes))
    queries = rng.standard_normal((50, num_filters)) @ mixing
    nearest = np.stack([test.distance(queries, np.full(50, c)) for c in range(classes_n)]).argmin(axis=0)
    expected = reference.predict_features(torch.tensor(queries, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(test.distance(queries, nearest), 2 * n * expected, rtol=2e-3)
    np.testing.assert_allclose(test.filter_terms(queries, nearest).sum(axis=1), test.distance(queries, nearest), rtol=1e-9)


def test_rank_outside_its_range_is_refused():
    mean = np.zeros((1, 4))
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]"):
        AlphaMahalanobis(mean, np.ones((1, 4)), np.ones((10, 4)), np.zeros(10, int), rank=4)
