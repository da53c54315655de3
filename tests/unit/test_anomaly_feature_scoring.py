"""The served five-test verdict: calibration with pooled features, the store's feature block, scoring."""

import shutil

import numpy as np
import pytest

from bench.ood_extended import ExtendedVerdict, own_classes
from explainserve.anomaly import Scorer, StoreError, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.calibration import MAX_CLASS_RANKS, split_parts, with_combined
from explainserve.anomaly.conformal import FIVE_TESTS, TESTS, fit_tail_grid
from explainserve.anomaly.feature_tests import FEATURE_TESTS, FeatureTests
from explainserve.anomaly.scorer import MAX_FLAGS, REASON_CODES, FeatureShare
from explainserve.anomaly.store import CALIBRATION_SPECS, FEATURE_SPECS, store_sha256, write_manifest
from explainserve.anomaly.synthetic import SyntheticClasses

TARGET = 0.05
NUM_CLASSES, NUM_FILTERS = 6, 32
#: Held-out images per class: classes 0-3 get their own group, 4 and 5 the fallback.
VAL_COUNTS = [600, 600, 600, 600, 60, 30]


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(NUM_CLASSES, NUM_FILTERS, seed=5)


@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory):
    folder = tmp_path_factory.mktemp("features") / "store"
    build_store(synthetic.batches(600), folder, synthetic.meta, build_time="2026-01-01T00:00:00Z")
    return folder


def held_out(synthetic, counts, seed):
    """Alpha, classes and pooled features of in-distribution images, classes interleaved in order."""
    classes = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    classes = classes[np.random.default_rng(seed).permutation(len(classes))]
    return synthetic.sample(classes, seed), classes, synthetic.features(classes, seed + 1)


def calibrated_copy(built, folder, alpha, classes, **options) -> Scorer:
    shutil.copytree(built, folder)
    store = load_store(folder)
    save_calibration(store, calibrate(store, alpha, classes, target_fpr=TARGET, **options))
    return Scorer(load_store(folder, into_memory=True))


@pytest.fixture(scope="module")
def val(synthetic):
    return held_out(synthetic, VAL_COUNTS, seed=100)


@pytest.fixture(scope="module")
def scorers(built, val, tmp_path_factory):
    """(with the feature block, alpha only), calibrated on the same held-out images."""
    alpha, classes, features = val
    root = tmp_path_factory.mktemp("calibrated")
    return (calibrated_copy(built, root / "five", alpha, classes, features=features),
            calibrated_copy(built, root / "three", alpha, classes))


def test_served_five_test_verdict_equals_the_bench_extended_verdict(synthetic, scorers, val):
    five, _ = scorers
    alpha, classes, features = val
    assert five.has_feature_tests and list(five.sources) == ["class"] * 4 + ["fallback"] * 2
    # The bench's recipe (bench/eval_ood.py feature_test_rows): feature tests fitted on val's part A,
    # then ExtendedVerdict with the five tests, in the store's groups.
    part_a = ~split_parts(classes)
    fitted = FeatureTests(features[part_a], classes[part_a], NUM_CLASSES)

    def bench_tests(alpha, classes, features):
        alpha_tests = five.score(alpha, classes).statistics[:, :3]
        return np.column_stack([alpha_tests, fitted.statistics(features, classes)]).astype(np.float32)

    verdict = ExtendedVerdict(bench_tests(alpha, classes, features), classes, own_classes(five.store), TARGET)
    test_alpha, test_classes, test_features = held_out(synthetic, [500] * NUM_CLASSES, seed=200)
    test_features[::3] += 0.03  # some inputs off the in-distribution features, so flags of both kinds occur
    combined, flags = verdict.score(bench_tests(test_alpha, test_classes, test_features), test_classes)
    served = five.score(test_alpha, test_classes, test_features)
    np.testing.assert_array_equal(served.statistics[:, :5], bench_tests(test_alpha, test_classes, test_features))
    np.testing.assert_array_equal(served.score, combined)
    np.testing.assert_array_equal(served.anomalous, flags)
    assert 0.1 < flags.mean() < 0.9


def test_calibrated_rate_holds_on_new_in_distribution_inputs(synthetic, scorers):
    five, _ = scorers
    alpha, classes, features = held_out(synthetic, [1000] * NUM_CLASSES, seed=300)
    batch = five.score(alpha, classes, features)
    assert batch.test_names == FIVE_TESTS and batch.statistics.shape == (len(alpha), 6)
    np.testing.assert_array_equal(batch.p_value, batch.p_values[:, 5])
    np.testing.assert_array_equal(batch.anomalous, batch.p_values[:, 5] < TARGET)
    assert abs(batch.anomalous.mean() - TARGET) < 0.015
    for test in range(5):  # each test alone, at its own critical value, holds the rate too
        assert abs((batch.p_values[:, test] < TARGET).mean() - TARGET) < 0.02, FIVE_TESTS[test]


def test_shifted_features_raise_the_feature_tests_evidence_and_name_the_features(synthetic, scorers):
    five, three = scorers
    alpha, classes, features = held_out(synthetic, [200] * NUM_CLASSES, seed=400)
    shifted = features.copy()
    shifted[:, [3, 17]] += [0.06, -0.05]  # alpha unchanged: only the features leave the distribution
    normal, moved = five.score(alpha, classes, features), five.score(alpha, classes, shifted)
    assert moved.anomalous.mean() > 0.95 and normal.anomalous.mean() < 0.1
    assert (moved.score > normal.score).mean() > 0.95
    assert (moved.statistics[:, 3:5] > normal.statistics[:, 3:5]).mean(axis=0).min() > 0.95
    for test in (3, 4):
        assert np.median(moved.p_values[:, test]) < 0.02 < np.median(normal.p_values[:, test])
    np.testing.assert_array_equal(three.score(alpha, classes).anomalous, five.score(alpha, classes).anomalous)
    sample = moved.sample(0)
    assert sample.verdict == "ANOMALOUS" and sample.p_value == moved.p_value[0]
    residual = next(reason for reason in sample.reasons if reason.code == "feature_residual")
    assert residual.p_value == moved.p_values[0, 4] and residual.value == pytest.approx(moved.statistics[0, 4])
    assert residual.threshold == pytest.approx(five.feature_critical[classes[0], 4])
    assert 0 < len(residual.features) <= MAX_FLAGS and isinstance(residual.features[0], FeatureShare)
    assert {share.feature for share in residual.features[:2]} == {3, 17}
    shares = [share.share for share in residual.features]
    assert shares == sorted(shares, reverse=True)
    terms = five.feature_tests.residual_terms(shifted[:1])[0]
    assert shares[0] == terms.max() and sum(terms) == pytest.approx(moved.statistics[0, 4] ** 2, rel=1e-5)
    last = len(moved.classes) - 1  # a row past the first: its own class's mean, not row 0's
    columns = moved.feature_columns(last, "feature_mahalanobis", None)
    assert sum(columns[1]) == pytest.approx(moved.statistics[last, 3], rel=1e-5)
    mahalanobis = moved.feature_columns(0, "feature_mahalanobis", None)
    assert sorted(mahalanobis[0]) == list(range(NUM_FILTERS)) and mahalanobis[1] == sorted(mahalanobis[1], reverse=True)
    assert sum(mahalanobis[1]) == pytest.approx(moved.statistics[0, 3], rel=1e-5)
    assert sample.feature_residual == pytest.approx(moved.statistics[0, 4])
    assert sample.feature_mahalanobis == pytest.approx(moved.statistics[0, 3])
    assert all(not reason.features for reason in sample.reasons if reason.code in TESTS)


def test_the_alpha_only_path_is_unchanged_by_the_feature_block(synthetic, scorers):
    five, three = scorers
    for name in CALIBRATION_SPECS:
        np.testing.assert_array_equal(five.store.arrays[name], three.store.arrays[name])
    assert {key: v for key, v in five.store.calibration.items() if key != "features"} == three.store.calibration
    assert "features" not in three.store.calibration and not three.has_feature_tests
    alpha, classes, features = held_out(synthetic, [100] * NUM_CLASSES, seed=500)
    alone = three.score(alpha, classes)
    for batch in (five.score(alpha, classes), three.score(alpha, classes, features)):  # features ignored without a block
        assert batch.test_names == TESTS and batch.features is None
        for field in ("statistics", "p_values", "critical", "tests", "anomalous", "score"):
            np.testing.assert_array_equal(getattr(batch, field), getattr(alone, field))
    assert five.score(alpha[:1], classes[:1]).sample(0).feature_mahalanobis is None


def test_the_feature_block_is_stored_hashed_and_removed_with_a_recalibration(built, val, scorers, tmp_path):
    five, _ = scorers
    alpha, classes, features = val
    folder = tmp_path / "store"
    shutil.copytree(five.store.path, folder)
    store = load_store(folder)
    assert set(FEATURE_SPECS) <= set(store.manifest["arrays"])
    assert store.arrays["feature_mahalanobis_basis"].shape == (NUM_FILTERS, NUM_FILTERS)  # K <= 128: full rank
    assert store.arrays["feature_isotropic"].tolist() == [0.0]
    assert store.arrays["feature_basis"].shape == (NUM_FILTERS, NUM_FILTERS // 2)
    section = store.calibration["features"]
    assert section["tests"] == list(FIVE_TESTS) and section["statistics"] == [*FEATURE_TESTS, "combined5"]
    assert section["num_features"] == NUM_FILTERS and section["residual_dimensions"] == NUM_FILTERS // 2
    assert section["fit"].startswith("part A") and section["fallback"]["count"] == store.calibration["fallback"]["count"]
    # The same section when the calibration runs inside this test (which a coverage-selected test run, as
    # mutation testing's, attributes to it rather than to the fixture).
    direct = calibrate(store, alpha, classes, features=features, target_fpr=TARGET).section["features"]
    assert direct["num_features"] == NUM_FILTERS and direct["mahalanobis_rank"] == NUM_FILTERS
    assert direct["fit"] == "part A: class means, tied covariance, principal directions"
    # A feature section that does not fit, hashed again so that only the scorer can refuse it.
    manifest = store.manifest
    features_section = manifest["calibration"]["features"]
    for broken, message in (({**features_section, "classes": {}}, r"malformed feature block \(KeyError\('critical'\)\)"),
                            ({**features_section,  # one critical value short per group
                              "classes": {"critical": [c and c[:-1] for c in features_section["classes"]["critical"]]},
                              "fallback": {**features_section["fallback"],
                                           "critical": features_section["fallback"]["critical"][:-1]}},
                             f"feature block does not cover its {NUM_CLASSES} classes$")):
        rewritten = dict(manifest, calibration=dict(manifest["calibration"], features=broken))
        write_manifest(folder, dict(rewritten, sha256=store_sha256(rewritten)))
        with pytest.raises(StoreError, match=f"^distribution store {folder}: {message}"):
            Scorer(load_store(folder))
    write_manifest(folder, manifest)
    corrupt = folder / "feature_basis.npy"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 1
    corrupt.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="feature_basis.npy sha256 does not match"):
        load_store(folder)
    save_calibration(store, calibrate(store, alpha, classes, target_fpr=TARGET))  # alpha only
    assert not any((folder / f"{name}.npy").exists() for name in FEATURE_SPECS)
    assert not Scorer(load_store(folder, into_memory=True)).has_feature_tests


def test_a_class_without_training_images_takes_the_pooled_features(synthetic, tmp_path):
    def without_class_5():
        for alpha, classes, ids in synthetic.batches(300):
            keep = classes != 5
            yield alpha[keep], classes[keep], ids[keep]

    build_store(without_class_5(), tmp_path / "store", synthetic.meta, build_time="2026-01-01T00:00:00Z")
    alpha, classes, features = held_out(synthetic, [300] * NUM_CLASSES, seed=600)
    scorer = calibrated_copy(tmp_path / "store", tmp_path / "cal", alpha, classes, features=features)
    tests = scorer.feature_tests
    np.testing.assert_array_equal(tests.class_means[5], tests.centre)
    assert scorer.sources[5] == "pooled" and scorer.has_feature_tests
    # By hand: every calibration image scored against the pool, five tests; tail grids on part A,
    # ranks of the feature tests and combined5 on the first part-B images.
    five = scorer.score(alpha, np.full(len(alpha), 5), features).statistics[:, :5]
    part_b = split_parts(classes)
    grid = fit_tail_grid(five[~part_b])
    np.testing.assert_array_equal(scorer.feature_tail_grid[5], grid)
    ranked = with_combined(five[part_b][:MAX_CLASS_RANKS], np.repeat(grid[None], min(part_b.sum(), MAX_CLASS_RANKS), axis=0))
    held = np.asarray(scorer.store.arrays["feature_class_ranks"][5])
    np.testing.assert_array_equal(held[:, :len(ranked)], np.sort(ranked[:, 3:], axis=0).T)
    new_alpha, new_classes, new_features = held_out(synthetic, [300] * NUM_CLASSES, seed=700)
    pooled = np.full(len(new_alpha), 5)
    batch = scorer.score(new_alpha, pooled, new_features)
    # Its null is every calibration image scored against the pool, so new ones hold the rate.
    assert abs(batch.anomalous.mean() - TARGET) < 0.02


def test_bad_features_are_named(scorers, val):
    five, _ = scorers
    alpha, classes, features = val
    with pytest.raises(ValueError, match=r"features must be \(3, 32\).*got shape \(3, 31\)"):
        five.score(alpha[:3], classes[:3], features[:3, :31])
    with pytest.raises(ValueError, match=r"features must be \(3, 32\).*got shape \(2, 32\)"):
        five.score(alpha[:3], classes[:3], features[:2])
    for bad in (np.nan, np.inf):
        broken = features[:3].copy()
        broken[1, 4] = bad
        with pytest.raises(ValueError, match=r"^features must be finite \(no NaN or infinity\)$"):
            five.score(alpha[:3], classes[:3], broken)
    with pytest.raises(ValueError, match="features must be"):
        calibrate(five.store, alpha, classes, features=features[:, :5])
    single = five.score(alpha[0], classes[0], features[0])  # one input: (K,) vectors
    assert single.statistics.shape == (1, 6) and REASON_CODES == TESTS + FEATURE_TESTS
    np.testing.assert_array_equal(five.score(alpha[:1], classes[:1], features[:1]).statistics, single.statistics)
    as_float64 = five.score(alpha[:2], classes[:2], features[:2].astype(np.float64))
    assert as_float64.features.dtype == np.float32
    with pytest.raises(ValueError, match=r"^test must be one of \('feature_mahalanobis', 'feature_residual'\), got 'surprise'$"):
        single.feature_columns(0, "surprise")
    with pytest.raises(ValueError, match="^feature_columns needs a batch scored with features$"):
        five.score(alpha[:1], classes[:1]).feature_columns(0, "feature_residual")
