"""FeatureTests: the pooled-feature Mahalanobis and residual tests, against independent references."""

import numpy as np
import pytest
import torch
from pytorch_ood.detector import Mahalanobis

from explainserve.anomaly import feature_tests
from explainserve.anomaly.feature_tests import FEATURE_RANK, FEATURE_TESTS, FeatureTests, cancels

#: How far the float32 statistics (float32 features: as served and calibrated) may lie from the
#: float64 ones, relatively: float32 rounding (eps 6e-8) of the deviations and of the K-term
#: products with the bases (at most 1.7e-6 on the demo networks' features). It moves a
#: conformal p-value only between calibration statistics closer than that, and calibration
#: ranks the same float32 statistics.
SINGLE_RTOL = 1e-5


def statistics_in_both_precisions(fitted: FeatureTests, queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(B, 2) float64 statistics of ``queries``, once the float32 ones have been checked against them."""
    double = fitted.statistics(queries.astype(np.float64), classes)
    single = fitted.statistics(queries.astype(np.float32), classes)
    assert double.dtype == np.float64 and single.dtype == np.float32
    np.testing.assert_allclose(single, double, rtol=SINGLE_RTOL)
    return double


def gaussian_classes(num_classes: int, dims: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) float32 features of well-separated classes sharing one full-rank covariance, and (n,) classes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, size=(num_classes, dims))
    mixing = rng.normal(0, 1, size=(dims, dims)) + 2 * np.eye(dims)
    classes = np.repeat(np.arange(num_classes), per_class)
    features = means[classes] + rng.standard_normal((len(classes), dims)) @ mixing.T
    return features.astype(np.float32), classes


def test_the_hand_computable_two_dimensional_case():
    # Class 0 around (0, 0), class 1 around (10, 0), the same four deviations: tied covariance diag(0.5, 2).
    deviations = np.array([[1, 0], [-1, 0], [0, 2], [0, -2]], dtype=np.float32)
    features = np.concatenate([deviations, deviations + [10, 0]])
    classes = np.repeat([0, 1], 4)
    fitted = FeatureTests(features, classes, num_classes=3)
    np.testing.assert_allclose(fitted.class_means, [[0, 0], [10, 0], [5, 0]])  # class 2: no image, the mean of all
    np.testing.assert_allclose(fitted.precision, np.diag([2.0, 0.5]), atol=1e-12)
    z = np.array([[1, 2], [1, 2]], dtype=np.float32)
    np.testing.assert_allclose(fitted.mahalanobis_terms(z, np.array([0, 1])), [[2, 2], [162, 2]], atol=1e-9)
    # About the mean (5, 0) the covariance is diag(25.5, 2): U (K // 2 = 1 direction) is the x axis,
    # so (1, 2) - (5, 0) = (-4, 2) leaves the residual (0, 2).
    np.testing.assert_allclose(np.abs(fitted.basis[:, 0]), [1, 0], atol=1e-12)
    np.testing.assert_allclose(fitted.residual_terms(z[:1]), [[0, 4]], atol=1e-9)
    np.testing.assert_allclose(statistics_in_both_precisions(fitted, z, np.array([0, 1])), [[4, 2], [164, 2]], atol=1e-9)


@pytest.mark.parametrize("num_classes, dims", [(3, 6), (5, 16)])
def test_mahalanobis_matches_pytorch_ood_per_class_and_at_the_nearest_class(num_classes, dims):
    features, classes = gaussian_classes(num_classes, dims, per_class=400, seed=dims)
    queries, _ = gaussian_classes(num_classes, dims, per_class=20, seed=dims + 1)
    queries = queries * 1.5  # some far from every class
    fitted = FeatureTests(features, classes, num_classes)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # pytorch-ood builds its means and covariance in the default dtype
    try:
        detector = Mahalanobis(None).fit_features(torch.from_numpy(features.astype(np.float64)), torch.from_numpy(classes))
        z = torch.from_numpy(queries.astype(np.float64))
        # pytorch-ood: -0.5 e^T S^-1 e per class with S the *sum* of outer products (+1e-6 I),
        # so d² with Σ = S / n is 2 n times its per-class distance; the detector takes the nearest.
        per_class = -2 * len(features) * detector._calc_gaussian_scores(z).numpy()
        nearest = 2 * len(features) * detector.predict_features(z).numpy()
    finally:
        torch.set_default_dtype(previous)
    ours = np.stack([statistics_in_both_precisions(fitted, queries, np.full(len(queries), c))[:, 0] for c in range(num_classes)], axis=1)
    np.testing.assert_allclose(ours, per_class, rtol=1e-6)
    scored_at_nearest = statistics_in_both_precisions(fitted, queries, ours.argmin(axis=1))[:, 0]
    np.testing.assert_allclose(scored_at_nearest, nearest, rtol=1e-6)


def test_mahalanobis_matches_a_plain_numpy_inverse():
    features, classes = gaussian_classes(4, 10, per_class=300, seed=7)
    fitted = FeatureTests(features, classes, 4)
    z = features.astype(np.float64)
    means = np.stack([z[classes == c].mean(axis=0) for c in range(4)])
    covariance = sum(np.outer(row - means[c], row - means[c]) for row, c in zip(z, classes)) / len(z)
    precision = np.linalg.inv(covariance)
    queries, query_classes = features[::37] + 0.5, classes[::37]
    expected = [(q - means[c]) @ precision @ (q - means[c]) for q, c in zip(queries.astype(np.float64), query_classes)]
    np.testing.assert_allclose(statistics_in_both_precisions(fitted, queries, query_classes)[:, 0], expected, rtol=1e-8)


@pytest.mark.parametrize("dims", [12, 13])
def test_residual_matches_a_plain_svd(dims):
    features, classes = gaussian_classes(3, dims, per_class=200, seed=11)
    fitted = FeatureTests(features, classes, 3)
    # float32 takes the complement of U's K // 2 directions when it has no more columns (K even),
    # and |z - m|² - |U^T (z - m)|² otherwise
    assert fitted.single_precision.complement == (dims % 2 == 0)
    z = features.astype(np.float64)
    centre = z.mean(axis=0)
    _, _, right = np.linalg.svd(z - centre, full_matrices=False)
    basis = right[:6].T  # the top K // 2 right singular vectors span the top principal directions
    queries = features[::17] * 1.3
    centred = queries.astype(np.float64) - centre
    expected = np.linalg.norm(centred - centred @ basis @ basis.T, axis=1)
    np.testing.assert_allclose(statistics_in_both_precisions(fitted, queries, classes[::17])[:, 1], expected, rtol=1e-8)


def test_terms_sum_to_the_statistics_and_the_arrays_round_trip():
    features, classes = gaussian_classes(3, 8, per_class=100, seed=3)
    fitted = FeatureTests(features, classes, 3, shared=np.array([False, False, True]))
    np.testing.assert_allclose(fitted.class_means[2], features.astype(np.float64).mean(axis=0))  # shared: the pool's
    queries, query_classes = features[::7] + 1.0, classes[::7]
    mahalanobis, residual = fitted.mahalanobis_terms(queries, query_classes), fitted.residual_terms(queries)
    statistics = statistics_in_both_precisions(fitted, queries, query_classes)
    assert statistics.shape == (len(queries), len(FEATURE_TESTS)) and statistics.dtype == np.float64
    np.testing.assert_allclose(mahalanobis.sum(axis=1), statistics[:, 0], rtol=1e-12)
    np.testing.assert_allclose(residual.sum(axis=1), statistics[:, 1] ** 2, rtol=1e-9)
    np.testing.assert_allclose(fitted.squared_residuals(queries.astype(np.float64)), statistics[:, 1] ** 2, rtol=1e-12)
    assert (residual >= 0).all()
    restored = FeatureTests.from_arrays({name: np.array(a) for name, a in fitted.arrays().items()})
    assert np.array_equal(statistics_in_both_precisions(restored, queries, query_classes), statistics)
    assert restored.num_features == 8 and fitted.basis.shape == (8, 4)


def pooled_features_of_a_demo_model(kind: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, K) pooled features of validation inputs through a trained demo model, exactly as
    served (``FilterScores.features``), and the predicted classes."""
    from explainserve import data
    from explainserve.commands.archive import demo_model
    from explainserve.explainer import Explainer

    model, metadata = demo_model(kind)
    explainer = Explainer(model, kind=metadata["kind"], input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"])
    if kind == "image":
        inputs = data.FashionScenes("val", seed=0, size=count, image_size=metadata["input_size"][-1])
    else:
        inputs = data.MovingFashion("val", seed=0, size=count)
    key = "image" if kind == "image" else "clip"
    scores = explainer.filter_scores([inputs[i][key] for i in range(count)])
    return scores.features, scores.predicted


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])  # a 2-D CNN (128 filters) and a 3-D one (64 filters)
def test_both_tests_match_their_references_on_a_trained_networks_pooled_features(kind):
    features, predicted = pooled_features_of_a_demo_model(kind, 300)
    # Scaled up: d² does not change, and pytorch-ood's ridge (1e-6 I on the summed covariance)
    # then weighs nothing against even the smallest direction of these features.
    features = features * np.float32(100)
    fit, queries = slice(0, 220), slice(220, None)
    num_classes = int(predicted.max()) + 1
    assert len(np.unique(predicted[fit])) == num_classes
    fitted = FeatureTests(features[fit], predicted[fit], num_classes)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        detector = Mahalanobis(None).fit_features(torch.from_numpy(features[fit].astype(np.float64)),
                                                  torch.from_numpy(predicted[fit]))
        per_class = -2 * 220 * detector._calc_gaussian_scores(torch.from_numpy(features[queries].astype(np.float64))).numpy()
    finally:
        torch.set_default_dtype(previous)
    ours = np.stack([statistics_in_both_precisions(fitted, features[queries], np.full(80, c))[:, 0] for c in range(num_classes)], axis=1)
    np.testing.assert_allclose(ours, per_class, rtol=1e-5)
    z = features[fit].astype(np.float64)
    _, _, right = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    basis = right[: z.shape[1] // 2].T
    centred = features[queries].astype(np.float64) - z.mean(axis=0)
    np.testing.assert_allclose(statistics_in_both_precisions(fitted, features[queries], predicted[queries])[:, 1],
                               np.linalg.norm(centred - centred @ basis @ basis.T, axis=1), rtol=1e-6)


def test_a_layer_wider_than_the_rank_keeps_the_top_directions_and_an_isotropic_rest():
    # K = 160 > R = 128: the reference takes the SVD of the deviations (not the covariance's
    # eigendecomposition): the top R directions weighted 1/λ, the other K - R at their mean.
    dims = FEATURE_RANK + 32
    features, classes = gaussian_classes(4, dims, per_class=150, seed=7)
    fitted = FeatureTests(features, classes, 4)
    z = features.astype(np.float64)
    means = np.stack([z[classes == c].mean(axis=0) for c in range(4)])
    _, singular, directions = np.linalg.svd(z - means[classes], full_matrices=True)
    variances = singular ** 2 / len(z)
    top = directions[:FEATURE_RANK].T
    rest = variances[FEATURE_RANK:].mean()
    precision = top @ np.diag(1 / variances[:FEATURE_RANK]) @ top.T + (np.eye(dims) - top @ top.T) / rest
    queries, query_classes = features[::9] * 1.2 + 0.5, classes[::9]
    deviation = queries.astype(np.float64) - means[query_classes]
    expected = np.einsum("ij,jk,ik->i", deviation, precision, deviation)
    statistics = statistics_in_both_precisions(fitted, queries, query_classes)
    np.testing.assert_allclose(statistics[:, 0], expected, rtol=1e-7)
    np.testing.assert_allclose(fitted.precision, precision, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fitted.mahalanobis_terms(queries, query_classes).sum(axis=1), statistics[:, 0], rtol=1e-9)
    assert fitted.mahalanobis_basis.shape == (dims, FEATURE_RANK) and fitted.basis.shape == (dims, dims // 2)
    assert fitted.isotropic[0] == pytest.approx(1 / rest, rel=1e-9)
    # The residual keeps min(K // 2, R) directions: at K = 2 R + 2 that is R.
    wide = np.random.default_rng(2).normal(size=(600, 2 * FEATURE_RANK + 2)).astype(np.float32)
    assert FeatureTests(wide, np.zeros(600, dtype=np.int64), 1).basis.shape == (2 * FEATURE_RANK + 2, FEATURE_RANK)


def test_a_dead_feature_gets_no_weight_below_the_rank_as_pinv_gives_it():
    features, classes = gaussian_classes(3, 6, per_class=200, seed=4)
    features[:, 2] = 0.0  # a ReLU filter that never fires: no variance
    fitted = FeatureTests(features, classes, 3)
    z = features.astype(np.float64)
    means = np.stack([z[classes == c].mean(axis=0) for c in range(3)])
    deviation = z - means[classes]
    np.testing.assert_allclose(fitted.precision, np.linalg.pinv(deviation.T @ deviation / len(z), hermitian=True),
                               rtol=1e-6, atol=1e-9)
    shifted = features[:5].copy()
    shifted[:, 2] = 50.0  # the pseudo-inverse cannot see it, as pytorch-ood's pinv cannot
    np.testing.assert_allclose(statistics_in_both_precisions(fitted, shifted, classes[:5])[:, 0], statistics_in_both_precisions(fitted, features[:5], classes[:5])[:, 0],
                               rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-9, 1e6])
def test_the_distance_does_not_depend_on_the_features_units(scale):
    # Activations in tiny or huge units (e.g. a layer after a small or large normalisation):
    # Mahalanobis distances are unit-free and the residual scales with the features.
    features, classes = gaussian_classes(3, 6, per_class=150, seed=8)
    queries, query_classes = features[::11] * 1.4, classes[::11]
    plain = statistics_in_both_precisions(FeatureTests(features, classes, 3), queries, query_classes)
    scaled = statistics_in_both_precisions(FeatureTests(features * scale, classes, 3), queries * scale, query_classes)
    np.testing.assert_allclose(scaled[:, 0], plain[:, 0], rtol=1e-6)
    np.testing.assert_allclose(scaled[:, 1], plain[:, 1] * scale, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-9, 1e-20])
def test_features_too_small_for_float32_are_scored_in_float64(scale):
    # Variances below float32's smallest normal number (1.2e-38; here 1e-38 at 1e-20): float32
    # would turn their weights and squared projections into inf and 0, so float32 features
    # are scored in float64, exactly as float64 features are.
    features, classes = gaussian_classes(3, 6, per_class=150, seed=8)
    queries, query_classes = features[::11] * 1.4, classes[::11]
    plain = FeatureTests(features, classes, 3).statistics(queries.astype(np.float64), query_classes)
    fitted = FeatureTests(features * np.float32(scale), classes, 3)
    single = fitted.statistics(queries * np.float32(scale), query_classes)
    assert (fitted.single_precision is None) == (scale < 1e-9)
    assert single.dtype == (np.float32 if scale == 1e-9 else np.float64)
    if scale < 1e-9:
        np.testing.assert_array_equal(single, fitted.statistics((queries * np.float32(scale)).astype(np.float64), query_classes))
    np.testing.assert_allclose(single[:, 0], plain[:, 0], rtol=SINGLE_RTOL)
    np.testing.assert_allclose(single[:, 1], plain[:, 1] * scale, rtol=SINGLE_RTOL)


def test_rows_float32_would_cancel_in_are_computed_again_in_float64(monkeypatch):
    # A layer wider than 2 R whose variance lies almost all in R directions, as a trained
    # 512-filter layer's does (99.9 %): d² = |e|² / σ² less the top directions' share and
    # r² = |z - m|² - |U^T (z - m)|² are differences of parts thousands of times larger.
    dims = 2 * FEATURE_RANK + 4
    rng = np.random.default_rng(12)
    directions = np.linalg.qr(rng.normal(size=(dims, dims)))[0]
    scales = np.where(np.arange(dims) < FEATURE_RANK, 1.0, 1e-2)
    classes = np.repeat(np.arange(2), 400)
    means = 3 + rng.normal(0, 0.5, size=(2, FEATURE_RANK)) @ directions[:, :FEATURE_RANK].T  # inside the top span
    features = (means[classes] + (rng.standard_normal((len(classes), dims)) * scales) @ directions.T).astype(np.float32)
    fitted = FeatureTests(features, classes, 2)
    queries, query_classes = features[::10], classes[::10]
    double = statistics_in_both_precisions(fitted, queries, query_classes)
    centred = queries.astype(np.float64) - fitted.centre
    assert ((centred ** 2).sum(axis=1) / double[:, 1] ** 2).min() > 1000  # what cancels
    monkeypatch.setattr(feature_tests, "CANCELLATION", np.inf)  # float32 throughout: far off
    error = np.abs(fitted.statistics(queries, query_classes) - double) / double
    assert (error.max(axis=0) > 10 * SINGLE_RTOL).all()


def test_cancels_takes_float32_rows_whose_cancelled_part_is_over_four_times_the_result():
    result, cancelled = np.array([1.0, 1.0, 2.0, -1e-9, 0.0]), np.array([4.0, 4.001, 4.0, 0.0, 0.0])
    assert cancels(result.astype(np.float32), cancelled.astype(np.float32)).tolist() == [False, True, False, True, False]
    assert not cancels(result, cancelled).any()  # float64 results are kept
