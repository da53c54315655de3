"""Calibration of the verdict: joint thresholds, the fallback, and the realised false-positive rate."""

import numpy as np
import pytest

from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.calibration import default_min_class_count, fit_thresholds, union_flags
from explainserve.anomaly.synthetic import SyntheticClasses


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(num_classes=4, num_filters=256, seed=5)


@pytest.fixture(scope="module")
def store_dir(synthetic, tmp_path_factory):
    return build_store(synthetic.batches(400), tmp_path_factory.mktemp("cal") / "store", synthetic.meta,
                       build_time="2026-01-01T00:00:00Z")


def test_fit_thresholds_takes_the_largest_rank_within_the_target():
    surprise = np.arange(100)  # distinct: rank m flags exactly the m largest
    expectation = np.zeros(100, dtype=int)
    beta_z = np.zeros(100)
    thresholds = fit_thresholds(surprise, expectation, beta_z, target_fpr=0.05)
    assert (thresholds.surprise, thresholds.expectation, thresholds.beta_z, thresholds.count) == (94, 0, 0.0, 100)
    assert union_flags(surprise, expectation, beta_z, thresholds).sum() == 5


def test_fit_thresholds_bounds_the_union_not_each_test():
    rng = np.random.default_rng(0)
    surprise, expectation = rng.poisson(2, 5000), rng.poisson(2, 5000)
    beta_z = rng.normal(size=5000)
    thresholds = fit_thresholds(surprise, expectation, beta_z, target_fpr=0.02)
    flagged = union_flags(surprise, expectation, beta_z, thresholds)
    assert 0.015 <= flagged.mean() <= 0.02
    # Each test alone flags less than the union.
    assert (surprise > thresholds.surprise).mean() < flagged.mean()
    assert (beta_z < thresholds.beta_z).mean() < flagged.mean()


def test_calibration_holds_the_target_fpr_on_fresh_in_distribution_data(synthetic, store_dir):
    store = load_store(store_dir)
    val_classes = np.repeat(np.arange(4), 3000)
    calibration = calibrate(store, synthetic.sample(val_classes, seed=101), val_classes, target_fpr=0.01)
    assert calibration["held_out_fpr"] <= 0.01
    assert calibration["min_class_count"] == 500
    assert calibration["classes"]["source"] == ["class"] * 4
    save_calibration(store, calibration)
    scorer = Scorer(load_store(store_dir))
    test_classes = np.repeat(np.arange(4), 10000)
    realised = scorer.score(synthetic.sample(test_classes, seed=202), test_classes).anomalous.mean()
    # Counts are small integers, so the union can only move in steps; 0.5-1.5 % around a 1 % target.
    assert 0.005 <= realised <= 0.015, realised
    # The verdict has power: filters 1.6x wider than in training are flagged almost always.
    noise = np.random.default_rng(3).standard_normal((len(test_classes), 256), dtype=np.float32)
    widened = synthetic.loc[test_classes] + 1.6 * synthetic.scale[test_classes] * noise
    assert scorer.score(widened, test_classes).anomalous.mean() > 0.9


def test_small_classes_use_the_recorded_fallback(synthetic, store_dir):
    store = load_store(store_dir)
    val_classes = np.concatenate([np.repeat([0, 1, 2], 500), np.full(12, 3)])
    calibration = calibrate(store, synthetic.sample(val_classes, seed=7), val_classes,
                            target_fpr=0.02, min_class_count=30)
    per_class = calibration["classes"]
    assert per_class["source"] == ["class", "class", "class", "fallback"]
    assert per_class["count"] == [500, 500, 500, 12]
    fallback = calibration["fallback"]
    assert fallback["count"] == 1512
    assert (per_class["surprise"][3], per_class["expectation"][3], per_class["beta_z"][3]) == \
        (fallback["surprise"], fallback["expectation"], fallback["beta_z"])
    save_calibration(store, calibration)
    reloaded = load_store(store_dir)  # the arrays and their sha256 are unchanged
    assert reloaded.calibration == calibration
    result = Scorer(reloaded).score(synthetic.loc[3] * 10, 3).sample(0)
    assert result.verdict == "ANOMALOUS" and {r.source for r in result.reasons} == {"fallback"}


def test_default_minimum_class_size_follows_the_target():
    assert default_min_class_count(0.01) == 500
    assert default_min_class_count(0.05) == 100
    assert default_min_class_count(0.5) == 30


def test_few_held_out_images_overshoot_the_target_which_the_default_minimum_avoids():
    # Why per-class thresholds need hundreds of images: fitted on 30, they flag several
    # times the target on new data; fitted on the default 500, close to it.
    rng = np.random.default_rng(4)

    def draw(n):
        return rng.poisson(2, n), rng.poisson(1, n), rng.normal(size=n)

    def realised(n):
        return np.mean([union_flags(*draw(20000), fit_thresholds(*draw(n), 0.01)).mean() for _ in range(40)])

    assert realised(30) > 0.04
    assert realised(default_min_class_count(0.01)) < 0.015


def test_calibrate_rejects_bad_parameters(synthetic, store_dir):
    store = load_store(store_dir)
    alpha, classes = synthetic.sample(np.zeros(5, int), seed=1), np.zeros(5, int)
    with pytest.raises(ValueError, match=r"target_fpr must be in \(0, 1\), got 0"):
        calibrate(store, alpha, classes, target_fpr=0)
    with pytest.raises(ValueError, match="min_class_count must be >= 1"):
        calibrate(store, alpha, classes, min_class_count=0)
    with pytest.raises(ValueError, match="at least one held-out image"):
        calibrate(store, alpha[:0], classes[:0])
    with pytest.raises(ValueError, match="alpha must have 256 filter scores"):
        calibrate(store, alpha[:, :10], classes)
