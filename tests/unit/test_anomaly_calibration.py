"""Calibration of the verdict: conformal p-values, per-class groups with different tails, the
fallback, and the realised false-positive rate."""

import numpy as np
import pytest

from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.calibration import (classes_never_anomalous, default_min_class_count, never_anomalous_warning,
                                              split_parts)
from explainserve.anomaly.reference import ClassReference
from explainserve.anomaly.conformal import (EVIDENCE_LEVELS, TAIL_LEVELS, RankTable, critical_value, fit_tail_grid,
                                            interpolated_p_values, order_keys, sorted_ranks, tail_evidence)
from explainserve.anomaly.synthetic import SyntheticClasses

# Held-out images of class c spread WIDTHS[c] times as far as its training images: class 1's
# tails are heavier than training, class 2's lighter. Pooled calibration cannot fit all three.
WIDTHS = np.array([1.0, 1.4, 0.7], dtype=np.float32)


def held_out_sample(synthetic, classes, seed):
    noise = np.random.default_rng(seed).standard_normal((len(classes), synthetic.loc.shape[1]), dtype=np.float32)
    return synthetic.loc[classes] + (WIDTHS[classes, None] * synthetic.scale[classes]) * noise


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(num_classes=3, num_filters=64, seed=5)


@pytest.fixture(scope="module")
def store_dir(synthetic, tmp_path_factory):
    return build_store(synthetic.batches(2000), tmp_path_factory.mktemp("cal") / "store", synthetic.meta,
                       build_time="2026-01-01T00:00:00Z")


def scorer_for(store_dir, alpha, classes, **options) -> Scorer:
    store = load_store(store_dir)
    save_calibration(store, calibrate(store, alpha, classes, **options))
    return Scorer(load_store(store_dir))


def test_rank_table_counts_like_searchsorted_on_every_row():
    rng = np.random.default_rng(0)
    counts = np.array([5, 0, 9, 1])
    rows = [np.sort(np.round(rng.normal(size=n), 1)).astype(np.float32) for n in counts]  # rounding makes ties
    rows[2][:3] = [-np.inf, -0.0, 0.0]
    rows[2].sort()
    ranks = np.stack([sorted_ranks(r[:, None], 9)[0] for r in rows])
    table = RankTable(ranks, counts)
    queries = np.concatenate([np.round(rng.normal(size=40), 1), [0.0, -0.0, np.inf, -np.inf]]).astype(np.float32)
    for row, values in enumerate(rows):
        expected = np.searchsorted(values, queries, side="left")
        np.testing.assert_array_equal(table.count_below(np.full(len(queries), row), queries), expected)
    keys = order_keys(np.array([-np.inf, -2.5, -0.0, 0.0, 1e-30, 3.0, np.inf], dtype=np.float32))
    assert (np.diff(keys.astype(np.int64)) >= 0).all() and keys[2] == keys[3]


def test_interpolated_p_values_by_hand():
    values = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)  # n = 4
    table = RankTable(sorted_ranks(values[:, None], 4), np.array([4]))
    queries = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 8.0, 100.0], dtype=np.float32)
    p = interpolated_p_values(table, np.zeros(len(queries), dtype=np.int64), queries)
    # At b[j], j >= 1, the rank is j: p = (4 - j) / 5; between, linear; at or below b[0] 1;
    # above b[3] 1/5.
    np.testing.assert_allclose(p, [1.0, 1.0, 3.5 / 5, 3 / 5, 2.5 / 5, 1 / 5, 1 / 5])
    # The critical value is where p reaches the target: 2.5 / 5 = 0.5 at 3.0, none for 0.1 < 1/5.
    assert critical_value(values, 0.5) == pytest.approx(3.0)
    assert critical_value(values, 0.1) == float("inf")


def test_p_values_are_uniform_for_exchangeable_inputs():
    # The guarantee the verdict rests on: an input exchangeable with part B gets P(p < t) = t
    # (within 1 / (n + 1)), here for n = 200 and many draws.
    rng = np.random.default_rng(1)
    n, draws = 200, 4000
    calibration = rng.gamma(2.0, size=(draws, n)).astype(np.float32)
    fresh = rng.gamma(2.0, size=draws).astype(np.float32)
    ranks = np.sort(calibration, axis=1)
    table = RankTable(ranks, np.full(draws, n))
    p = interpolated_p_values(table, np.arange(draws), fresh)
    for target in (0.01, 0.05, 0.2, 0.5):
        assert abs((p < target).mean() - target) < 3 * np.sqrt(target / draws) + 1 / (n + 1), target


def test_tail_model_interpolates_then_follows_the_exponential_tail():
    # 200 part-A values: 0..198 / 10 and one at 100; the 1 % quantile is 19.701.
    values = np.concatenate([np.arange(199) / 10, [100.0]])[:, None]
    grid = fit_tail_grid(values)
    quantiles = np.quantile(values[:, 0], 1 - TAIL_LEVELS)
    np.testing.assert_allclose(grid[0, :-2], quantiles)
    above = values[values[:, 0] > quantiles[-1], 0]  # 19.8 and 100
    assert grid[0, -2] == pytest.approx(max(-np.log(3 / 201), EVIDENCE_LEVELS[-1]))
    assert grid[0, -1] == pytest.approx(np.mean(above - quantiles[-1]))
    points = np.array([[-1.0], [quantiles[2]], [(quantiles[2] + quantiles[3]) / 2], [quantiles[-1] + 10]])
    evidence = tail_evidence(points, np.repeat(grid[None], 4, axis=0))[:, 0]
    np.testing.assert_allclose(evidence, [EVIDENCE_LEVELS[0], EVIDENCE_LEVELS[2],
                                          (EVIDENCE_LEVELS[2] + EVIDENCE_LEVELS[3]) / 2,
                                          grid[0, -2] + 10 / grid[0, -1]])


def test_an_atom_starts_its_tail_at_its_own_share():
    # 0 for 996 of 1000 part-A images (a statistic that rarely fires): a small exceedance gets
    # the evidence of the 5 in 1001 past the atom, not an unbounded one.
    values = np.zeros((1000, 1))
    values[:4, 0] = [0.5, 1.0, 1.5, 2.0]
    grid = fit_tail_grid(values)
    assert grid[0, -2] == pytest.approx(-np.log(5 / 1001)) and grid[0, -1] == pytest.approx(1.25)
    evidence = tail_evidence(np.array([[0.0], [0.1], [2.5]]), np.repeat(grid[None], 3, axis=0))[:, 0]
    np.testing.assert_allclose(evidence, [EVIDENCE_LEVELS[0], -np.log(5 / 1001) + 0.08, -np.log(5 / 1001) + 2.0])


def test_parts_alternate_within_each_class():
    classes = np.array([0, 0, 1, 0, 1, 1, 2])
    np.testing.assert_array_equal(split_parts(classes), [False, True, False, False, True, False, False])


def test_each_class_holds_the_target_with_its_own_tails(synthetic, store_dir):
    # Different held-out tails per class: class-own ranks give every class the target rate; the
    # class-independent pool (what a calibration that ignored the classes would give) does not.
    target = 0.05
    val_classes = np.tile(np.arange(3), 2000)
    val_alpha = held_out_sample(synthetic, val_classes, seed=101)
    test_classes = np.repeat(np.arange(3), 20000)
    test_alpha = held_out_sample(synthetic, test_classes, seed=202)

    own = scorer_for(store_dir, val_alpha, val_classes, target_fpr=target)
    section = own.store.calibration
    assert section["min_class_count"] == 50 and section["classes"]["source"] == ["class"] * 3
    # The manifest records, in words, the split that split_parts makes (test_parts_alternate_within_each_class).
    assert section["split"] == {"rule": "within each class, even positions part A (scales, tail grids), odd part B (ranks)",
                                "part_a": 3000, "part_b": 3000}
    assert section["classes"]["scale"] == ["held-out"] * 3
    # Each class's thresholds follow its tails: β_z spreads with the width, so the low-β critical
    # value (on -β_z) is largest for the widest class and smallest for the narrowest.
    low_beta = [critical[2] for critical in section["classes"]["critical"]]
    assert low_beta[1] > low_beta[0] > low_beta[2]
    anomalous = own.score(test_alpha, test_classes).anomalous
    for class_id in range(3):
        realised = anomalous[test_classes == class_id].mean()
        assert abs(realised - target) < 0.015, (class_id, realised)

    pooled = scorer_for(store_dir, val_alpha, val_classes, target_fpr=target, min_class_count=10**6)
    assert pooled.store.calibration["classes"]["source"] == ["fallback"] * 3
    anomalous = pooled.score(test_alpha, test_classes).anomalous
    rates = [anomalous[test_classes == class_id].mean() for class_id in range(3)]
    assert rates[1] > target + 0.03 and rates[2] < target - 0.02, rates


def test_realised_rate_at_one_percent_and_the_verdict_has_power(synthetic, store_dir):
    val_classes = np.tile(np.arange(3), 1500)
    scorer = scorer_for(store_dir, synthetic.sample(val_classes, seed=11), val_classes, target_fpr=0.01)
    assert scorer.store.calibration["classes"]["source"] == ["class"] * 3  # 750 part-B images >= 200
    test_classes = np.repeat(np.arange(3), 20000)
    batch = scorer.score(synthetic.sample(test_classes, seed=12), test_classes)
    assert abs(batch.anomalous.mean() - 0.01) < 0.004, batch.anomalous.mean()
    # Inputs whose filters spread 1.6x wider than in training are flagged most of the time.
    noise = np.random.default_rng(3).standard_normal((3000, 64), dtype=np.float32)
    widened = synthetic.loc[test_classes[:3000]] + 1.6 * synthetic.scale[test_classes[:3000]] * noise
    assert scorer.score(widened, test_classes[:3000]).anomalous.mean() > 0.5


def test_small_classes_use_the_recorded_fallback(synthetic, store_dir):
    val_classes = np.concatenate([np.tile([0, 1], 600), np.full(12, 2)])
    scorer = scorer_for(store_dir, synthetic.sample(val_classes, seed=7), val_classes,
                        target_fpr=0.02, min_class_count=100)
    section = scorer.store.calibration
    assert section["classes"]["source"] == ["class", "class", "fallback"]
    assert section["classes"]["count"] == [300, 300, 6]
    assert section["classes"]["critical"][2] is None and section["fallback"]["count"] == 606
    assert section["classes"]["scale"] == ["held-out", "held-out", "training"]  # 6 part-A images < 30
    assert scorer.store.arrays["tail_grid"].shape == (3, 3, len(TAIL_LEVELS) + 2)
    far = scorer.score(synthetic.loc[2] * 10, 2).sample(0)
    assert far.verdict == "ANOMALOUS" and {r.source for r in far.reasons} == {"fallback"}
    assert far.p_value == pytest.approx(1 / 607)  # past every one of the 606 fallback images
    # the smallest p-value each class's group allows: its own 300 ranks, or the fallback's 606
    assert far.smallest_p_value == 1 / 607 and scorer.smallest_p_value.tolist() == [1 / 301, 1 / 301, 1 / 607]


def test_ranked_images_are_bounded_by_the_first_in_order(synthetic, store_dir, monkeypatch):
    from explainserve.anomaly import calibration

    monkeypatch.setattr(calibration, "MAX_CLASS_RANKS", 40)
    monkeypatch.setattr(calibration, "MAX_FALLBACK_RANKS", 70)
    val_classes = np.tile(np.arange(3), 200)  # 100 part-B images per class
    val_alpha = synthetic.sample(val_classes, seed=13)
    scorer = scorer_for(store_dir, val_alpha, val_classes, target_fpr=0.05, min_class_count=40)
    section = scorer.store.calibration
    assert section["classes"]["count"] == [40] * 3 and section["fallback"]["count"] == 70
    assert scorer.store.arrays["class_ranks"].shape == (3, 4, 40)
    assert scorer.store.arrays["fallback_ranks"].shape == (4, 70)
    # Class 0's ranked images are its first 40 part-B images: positions 1, 3, ..., 79 among its own.
    first = val_alpha[val_classes == 0][1:80:2]
    np.testing.assert_array_equal(np.sort(scorer.score(first, np.zeros(40, int)).statistics[:, 0]),
                                  scorer.store.arrays["class_ranks"][0, 0])


def test_default_minimum_class_size_follows_the_target():
    assert default_min_class_count(0.01) == 200
    assert default_min_class_count(0.001) == 2000
    assert default_min_class_count(0.05) == 50


def test_calibrate_rejects_bad_parameters(synthetic, store_dir):
    store = load_store(store_dir)
    alpha, classes = synthetic.sample(np.zeros(5, int), seed=1), np.zeros(5, int)
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match=rf"target_fpr must be in \(0, 1\), got {bad}"):
            calibrate(store, alpha, classes, target_fpr=bad)
    with pytest.raises(ValueError, match="min_class_count must be >= 1"):
        calibrate(store, alpha, classes, min_class_count=0)
    with pytest.raises(ValueError, match="at least two held-out images"):
        calibrate(store, alpha[:1], classes[:1])
    with pytest.raises(ValueError, match="alpha must have 64 filter scores"):
        calibrate(store, alpha[:, :10], classes)


def test_scales_groups_and_ranks_by_hand(synthetic, store_dir):
    # Part A is each class's even positions, part B its odd ones. Class 0 has exactly
    # MIN_SCALE_IMAGES (30) part-A images and min_class_count (30) part-B images, so both its
    # scales and its ranks are its own; class 1 has one fewer of each, so neither is.
    classes = np.random.default_rng(8).permutation(np.repeat([0, 1, 2], [60, 58, 201]))
    alpha = synthetic.sample(classes, seed=9)
    store = load_store(store_dir)
    fitted = calibrate(store, alpha, classes, target_fpr=0.1, min_class_count=30, scored_against="label")
    part_a = {c: np.flatnonzero(classes == c)[0::2] for c in range(3)}
    part_b = {c: np.flatnonzero(classes == c)[1::2] for c in range(3)}
    training_iqr = ClassReference(store).training_iqr()
    for c, origin in enumerate(["held-out", "training", "held-out"]):
        rows = alpha[part_a[c]].astype(np.float64)
        expected = np.percentile(rows, 75, axis=0) - np.percentile(rows, 25, axis=0) if origin == "held-out" \
            else training_iqr[c]
        np.testing.assert_allclose(fitted.arrays["scale"][c], expected, rtol=1e-6, err_msg=origin)
    section = fitted.section
    assert section["classes"]["scale"] == ["held-out", "training", "held-out"]
    assert section["classes"]["count"] == [30, 29, 100]
    assert section["classes"]["source"] == ["class", "fallback", "class"]
    assert section["split"]["part_a"] == 30 + 29 + 101 and section["split"]["part_b"] == 30 + 29 + 100
    assert (section["target_fpr"], section["min_class_count"], section["scored_against"], section["held_out_images"]) \
        == (0.1, 30, "label", 319)
    assert section["fallback"]["count"] == 159 and fitted.arrays["fallback_ranks"].shape == (4, 159)
    # A class on the fallback has its grid and no ranks; an own class's ranks are its part-B
    # images' statistics, sorted, padded with +inf to the widest class.
    grids, ranks = fitted.arrays["tail_grid"], fitted.arrays["class_ranks"]
    assert ranks.shape == (3, 4, 100) and np.isinf(ranks[1]).all() and np.isinf(ranks[0, :, 30:]).all()
    assert ranks.dtype == np.float32 and fitted.arrays["scale"].dtype == np.float32
    assert not np.array_equal(grids[0], grids[1]) and not np.array_equal(grids[2], grids[1])
    save_calibration(store, fitted)
    scorer = Scorer(load_store(store_dir))
    for c in (0, 2):
        statistics = scorer.score(alpha[part_b[c]], np.full(len(part_b[c]), c)).statistics
        np.testing.assert_allclose(ranks[c, :, :len(part_b[c])], np.sort(statistics, axis=0).T, rtol=1e-6)
        assert section["classes"]["critical"][c] == [
            pytest.approx(critical_value(np.sort(statistics[:, s]), 0.1)) for s in range(4)]
    assert section["classes"]["critical"][1] is None
    # Tail grids: an own class's from its part-A images, the fallback's from every part-A image.
    for c in (0, 2):
        tests = scorer.score(alpha[part_a[c]], np.full(len(part_a[c]), c)).statistics[:, :3]
        np.testing.assert_allclose(grids[c], fit_tail_grid(tests), rtol=1e-6)
    every_a = np.sort(np.concatenate(list(part_a.values())))
    every_a_tests = scorer.score(alpha[every_a], classes[every_a]).statistics[:, :3]
    np.testing.assert_allclose(grids[1], fit_tail_grid(every_a_tests), rtol=1e-6)
    # The fallback ranks hold every part-B image, class 1's among them, under the fallback grid.
    statistics = scorer.score(alpha[part_b[1]], np.ones(29, int)).statistics
    for s in range(4):
        assert np.isin(statistics[:, s], fitted.arrays["fallback_ranks"][s]).all()


def test_the_smallest_calibration_and_its_recorded_defaults(synthetic, store_dir):
    # Two images of one class, the least accepted: one part-A and one part-B image.
    classes = np.zeros(2, int)
    fitted = calibrate(load_store(store_dir), synthetic.sample(classes, seed=4), classes, min_class_count=1)
    section = fitted.section
    assert section["split"]["part_a"] == 1 and section["split"]["part_b"] == 1
    assert fitted.arrays["class_ranks"].shape == (3, 4, 1)  # as wide as the one ranked image
    assert section["scored_against"] == "predicted" and section["target_fpr"] == 0.01
    # One ranked image cannot give a p-value below 1 / 2: no critical value, None in the JSON.
    assert section["classes"]["critical"][0] == [None] * 4 and section["fallback"]["critical"] == [None] * 4


def test_groups_too_small_to_reach_the_target_are_named(synthetic, store_dir):
    store = load_store(store_dir)
    names = ["coat", "bag", "shirt"]

    def section(counts, **options):
        classes = np.repeat(np.arange(3), counts)  # part B: the odd positions of each class
        return calibrate(store, synthetic.sample(classes, seed=21), classes, **options).section

    # Every class under the default minimum (200) ranks in the fallback group. Its p-values are
    # never below 1 / (n + 1): n = 99 cannot go below 1 %, n = 100 can.
    at_99 = section([67, 67, 66])
    assert at_99["fallback"]["count"] == 99 and classes_never_anomalous(at_99) == {99: [0, 1, 2]}
    assert never_anomalous_warning(at_99, names) == (
        "the verdict can never be ANOMALOUS at the 1.00% target for 3 of 3 classes (coat, bag, shirt): their groups "
        "rank only 99 part-B validation samples, and a p-value is never below 1/(n + 1) (1.00% for 99). A group "
        "reaches 1.00% from 100 ranked samples on (half of the validation samples are ranked): give more validation "
        "samples, or calibrate to a target above 1.00%")
    at_100 = section([68, 66, 66])
    assert at_100["fallback"]["count"] == 100
    assert classes_never_anomalous(at_100) == {} and never_anomalous_warning(at_100, names) is None
    # Own groups: class 0 ranks its 20 part-B images alone, class 1 its 201, class 2 (4 < 10) the fallback's 225.
    mixed = section([40, 402, 8], min_class_count=10)
    assert mixed["classes"]["source"] == ["class", "class", "fallback"]
    assert classes_never_anomalous(mixed) == {20: [0]}
    assert "for 1 of 3 classes (coat): their groups rank only 20 part-B" in never_anomalous_warning(mixed, names)
    # At 5 %, 20 ranked images reach the target (21 x 0.05 > 1), 19 do not.
    assert classes_never_anomalous(section([40, 402, 8], min_class_count=10, target_fpr=0.05)) == {}
    five = section([38, 402, 8], min_class_count=10, target_fpr=0.05)
    assert classes_never_anomalous(five) == {19: [0]}
    assert "reaches 5.00% from 20 ranked samples on" in never_anomalous_warning(five, names)


def test_the_warning_lists_ten_classes_at_most_and_every_group_size():
    def section(sources, counts, critical_of_own, fallback_count):
        return {"target_fpr": 0.01, "fallback": {"count": fallback_count, "critical": [None] * 4},
                "classes": {"source": sources, "count": counts,
                            "critical": [critical_of_own if source == "class" else None for source in sources]}}

    names = [f"c{i}" for i in range(12)]
    ten = never_anomalous_warning(section(["fallback"] * 10, [3] * 10, None, 30), names)
    assert "for 10 of 10 classes (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9): their groups rank only 30 part-B" in ten
    eleven = never_anomalous_warning(section(["fallback"] * 11, [3] * 11, None, 36), names)
    assert "for 11 of 11 classes (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, ...): their groups rank only 36" in eleven
    # Two groups too small, of 20 and 36 ranked images: both sizes named, the smaller sets the way out.
    both = never_anomalous_warning(section(["class", "fallback"], [20, 5], [None] * 4, 36), names)
    assert "for 2 of 2 classes (c0, c1): their groups rank only 20 or 36 part-B validation samples" in both
    assert both.endswith("(4.76% for 20). A group reaches 1.00% from 100 ranked samples on (half of the validation "
                         "samples are ranked): give more validation samples, or calibrate to a target above 4.76%")
