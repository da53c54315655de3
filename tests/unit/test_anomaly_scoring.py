"""Scoring semantics on hand-made distributions: surprise, expectation with the mu condition, β, verdicts."""

import shutil

import numpy as np
import pytest

from explainserve.anomaly import (ANOMALOUS, NORMAL, Scorer, StoreError, StoreMeta, build_store, calibrate,
                                  load_store, region_flag, save_calibration)
from explainserve.anomaly.conformal import fit_tail_grid
from explainserve.anomaly.pooled import mixture_quantiles
from explainserve.anomaly.calibration import Calibration
from explainserve.anomaly.reference import ClassReference, Flags, percentile_in_grid
from explainserve.anomaly.scorer import FilterFlag, Reason
from explainserve.anomaly.summary import PERCENTILE_LEVELS
from explainserve.anomaly.store import MANIFEST, store_sha256, write_manifest

# Class c's training image i has alpha = i * SCALES[c], i = 0..1000, so with 1001 images the
# exact P0.1 is 1 * scale, P99.9 is 999 * scale and mu is 500 * scale. Class 2 has no images.
SCALES = np.array([[1.0, 2.0, 0.5, 0.1], [0.1, 0.5, 2.0, 1.0]], dtype=np.float32)
STEPS = np.arange(1001)
META = StoreMeta("hand", "1", "layer4", {"size": [8, 8]}, ("zero", "one", "empty"), 4)


def training_alpha(class_id):
    return STEPS[:, None].astype(np.float32) * SCALES[class_id]


def training_betas(class_id):
    alpha = training_alpha(class_id)
    return alpha.mean(axis=1, dtype=np.float64) - alpha.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float64).mean()


def held_out():
    """Held-out images: every training vector of class 0 and every other one of class 1, plus
    noise that moves each filter by up to 1 % of its class's range."""
    alpha = np.concatenate([training_alpha(0), training_alpha(1)[::2]])
    classes = np.repeat([0, 1], [1001, 501])
    noise = np.random.default_rng(0).uniform(-1, 1, alpha.shape).astype(np.float32)
    return alpha + 0.01 * noise * SCALES[classes] * 1000, classes


def calibrated(store_dir, **options) -> Scorer:
    store = load_store(store_dir)
    save_calibration(store, calibrate(store, *held_out(), **options))
    return Scorer(load_store(store_dir))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    # Images of both classes interleaved: class 0 image i has id 2i, class 1 image i has id 2i + 1.
    alpha = np.stack([training_alpha(0), training_alpha(1)], axis=1).reshape(-1, 4)
    classes = np.tile([0, 1], len(STEPS))
    ids = np.arange(len(alpha))
    batches = [(alpha[s:s + 300], classes[s:s + 300], ids[s:s + 300]) for s in range(0, len(alpha), 300)]
    return build_store(batches, tmp_path_factory.mktemp("hand") / "store", META, top_k=3, build_time="2026-01-01T00:00:00Z")


@pytest.fixture()
def scorer(store_dir):
    # Part B holds 500 images of class 0 (its own ranks) and 250 of class 1 (the fallback's).
    return calibrated(store_dir, min_class_count=500, target_fpr=0.05)


PROBE = np.array([999.5, 1.5, 0.4, 0.1 * np.float32(999)], dtype=np.float32)


def test_distribution_store_holds_the_exact_tails(store_dir):
    store = load_store(store_dir)
    np.testing.assert_array_equal(store.arrays["p_low"][:2], SCALES)
    np.testing.assert_array_equal(store.arrays["p_high"][:2], [training_alpha(0)[999], training_alpha(1)[999]])
    np.testing.assert_allclose(store.arrays["mean"][:2], 500 * SCALES, rtol=1e-6)
    # Filter 0 of class 0 is highest on its last images: ids 2000, 1998, 1996.
    np.testing.assert_array_equal(store.arrays["exemplars"][0, 0], [2000, 1998, 1996])
    np.testing.assert_array_equal(store.arrays["exemplars"][1, 0], [2001, 1999, 1997])


def test_surprise_is_strictly_above_p999_and_expectation_needs_an_important_filter(scorer):
    against_zero = scorer.score(PROBE, 0).sample(0)
    # f0 999.5 > 999; f3 equals P99.9 exactly, so it is not surprising.
    assert [flag.filter for flag in against_zero.surprising] == [0]
    assert against_zero.surprising[0].threshold == 999.0 and against_zero.surprising[0].alpha == np.float32(999.5)
    assert against_zero.surprising[0].exemplars == (2000, 1998, 1996)
    # f1 1.5 < P0.1 = 2 with mu 1000 > mean mu 450; f2 0.4 < 0.5 but mu 250 < 450 keeps it out.
    assert [flag.filter for flag in against_zero.expected_missing] == [1]
    assert against_zero.expected_missing[0].threshold == 2.0
    # Against class 1 the same vector flags f0 (> 99.9) and f2 (< 2, mu 1000 > 450) instead.
    against_one = scorer.score(PROBE, 1).sample(0)
    assert [flag.filter for flag in against_one.surprising] == [0]
    assert [flag.filter for flag in against_one.expected_missing] == [2]
    assert against_one.class_name == "one"


def test_flags_are_ordered_most_extreme_first(scorer):
    # f0 exceeds 999 by 501 (1.0 of its held-out IQR, 500), f3 exceeds 99.9 by 100 (2.0 IQRs of 50):
    # in robust units f3 is the more surprising.
    alpha = np.array([1500, 1.5, 0.4, 200.0], dtype=np.float32)
    assert [flag.filter for flag in scorer.score(alpha, 0).sample(0).surprising] == [3, 0]
    assert region_flag(scorer.score(alpha, 0).sample(0).surprising).filter == 3  # the region a server shows
    alpha = np.array([3000, 1.5, 0.1, 999.0], dtype=np.float32)  # against class 1: f2 misses 2 by 1.9, f3 sits above 1
    flags = scorer.score(alpha, 1).sample(0)
    assert [flag.filter for flag in flags.expected_missing] == [2]


def test_max_flags_keeps_the_most_extreme(scorer):
    batch = scorer.score(np.array([1500, 1.5, 0.4, 200.0], dtype=np.float32), 0)
    full, capped = batch.sample(0), batch.sample(0, max_flags=1)
    assert capped.surprising == full.surprising[:1] and len(full.surprising) == 2
    assert batch.surprise_count[0] == 2 and capped.verdict == full.verdict and capped.beta == full.beta


def test_beta_and_its_percentile_follow_the_training_distribution(scorer):
    for alpha in (PROBE, training_alpha(0)[100], training_alpha(0)[1000] * 2):
        result = scorer.score(alpha, 0).sample(0)
        betas = training_betas(0)
        expected_beta = alpha.astype(np.float64).mean() - np.float64(500) * SCALES[0].astype(np.float64).mean()
        assert result.beta == pytest.approx(expected_beta, rel=1e-6, abs=1e-6)
        grid = np.percentile(betas, np.arange(101)).astype(np.float32)
        assert result.beta_percentile == pytest.approx(np.interp(result.beta, grid, np.arange(101)), abs=1e-4)
        assert result.beta_z == pytest.approx((result.beta - grid[50]) / (grid[75] - grid[25]), rel=1e-5)
    assert scorer.score(training_alpha(0)[100], 0).sample(0).beta_percentile == pytest.approx(10, abs=0.01)


def test_graded_statistics_sum_the_exceedances_in_held_out_scales(scorer):
    result = scorer.score(PROBE, 0).sample(0)
    scale = scorer.store.arrays["scale"][0]
    # The held-out IQR of a filter spreading uniformly over 0..1000 x its scale is 500 x its scale.
    np.testing.assert_allclose(scale, 500 * SCALES[0], rtol=0.01)
    assert result.surprising[0].exceedance == pytest.approx((999.5 - 999) / scale[0], rel=1e-5)
    assert result.surprise == pytest.approx(result.surprising[0].exceedance, rel=1e-5)
    assert result.missing == pytest.approx((2 - 1.5) / scale[1], rel=1e-5)


def test_verdict_is_anomalous_exactly_below_the_target_and_says_why(scorer):
    rng = np.random.default_rng(2)
    alpha = (rng.random((300, 4)) * [1300, 2600, 650, 130] - [100, 200, 50, 10]).astype(np.float32)
    classes = rng.integers(0, 2, 300)
    batch = scorer.score(alpha, classes)
    np.testing.assert_array_equal(batch.anomalous, batch.p_value < 0.05)
    assert 0 < batch.anomalous.sum() < 300
    np.testing.assert_array_equal(batch.from_class, classes == 0)
    section = scorer.store.calibration
    own, fallback = section["classes"]["critical"][0], section["fallback"]["critical"]
    assert None not in own + fallback and own != fallback
    np.testing.assert_array_equal(batch.critical, np.where((classes == 0)[:, None], own, fallback))
    # The smallest p-value each group can give: 1 / (n + 1), class 0's own ranks or the fallback's.
    ranked = [section["classes"]["count"][0], section["fallback"]["count"]]
    assert scorer.smallest_p_value[:2].tolist() == [1 / (ranked[0] + 1), 1 / (ranked[1] + 1)]
    assert ranked[0] != ranked[1] and batch.p_value.min() >= min(scorer.smallest_p_value[:2])
    for index in range(300):
        sample = batch.sample(index)
        assert sample.p_value == batch.p_value[index] and sample.score == batch.statistics[index, 3]
        assert sample.smallest_p_value == scorer.smallest_p_value[sample.class_id]
        assert sample.class_id == classes[index]
        if sample.verdict == NORMAL:
            assert sample.reasons == ()
            continue
        assert sample.reasons and all(r.source == ("class" if classes[index] == 0 else "fallback") for r in sample.reasons)
        assert [r.p_value for r in sample.reasons] == sorted(r.p_value for r in sample.reasons)
        for reason in sample.reasons:
            test = ("surprise", "missing", "low_beta").index(reason.code)
            assert reason.p_value == batch.p_values[index, test]
            relation = reason.value < reason.threshold if reason.code == "low_beta" else reason.value > reason.threshold
            assert relation == (reason.p_value < 0.05)
    # A held-out-like vector is normal, one far past every tail is not.
    assert scorer.score(training_alpha(0)[500], 0).sample(0).verdict == NORMAL
    far = scorer.score(training_alpha(0)[1000] * 3, 0).sample(0)
    assert far.verdict == ANOMALOUS and far.reasons[0].code == "surprise" and str(far.reasons[0]).startswith("surprise ")


def test_a_reason_reads_as_the_test_against_its_bound():
    assert str(Reason("surprise", 4.5, 2.0, "class", 0.0123)) == "surprise 4.5 > 2, p = 0.0123 (class calibration)"
    assert str(Reason("low_beta", -3.5, -2.25, "pooled", 0.001)) == "beta_z -3.5 < -2.25, p = 0.001 (pooled calibration)"


def test_region_flag_skips_filters_that_score_zero():
    silent, active = FilterFlag(3, 0.0, -1.0, (), 2.0), FilterFlag(1, 1.0, 0.5, (), 1.0)
    assert region_flag([silent, active]) is active
    assert region_flag([silent]) is None and region_flag([]) is None


def test_low_beta_reason_reports_beta_z_and_its_bound(scorer):
    # Filters 2 and 3 (not expected: their mu is below the mean mu) far below their range pull β
    # down without flagging anything: low β alone makes the verdict.
    sample = scorer.score(np.array([2, 4, -5000, -5000], np.float32), 0).sample(0)
    assert sample.surprising == () and sample.expected_missing == () and sample.beta_z < -5
    assert sample.verdict == ANOMALOUS and [reason.code for reason in sample.reasons] == ["low_beta"]
    reason = sample.reasons[0]
    assert reason.value == pytest.approx(sample.beta_z)
    assert reason.threshold == pytest.approx(-scorer.store.calibration["classes"]["critical"][0][2])
    assert reason.value < reason.threshold


def test_a_p_value_equal_to_the_target_is_normal(store_dir, tmp_path):
    # 19 part-B images of class 0 (and 19 in the fallback): no p-value is below 1 / 20, the
    # target here, so no critical value is reachable and an input past every image is NORMAL.
    directory = tmp_path / "store"
    shutil.copytree(store_dir, directory)
    store = load_store(directory)
    save_calibration(store, calibrate(store, training_alpha(0)[5::26][:38], np.zeros(38, int),
                                      min_class_count=1, target_fpr=0.05))
    scorer = Scorer(load_store(directory))
    assert scorer.store.calibration["classes"]["count"][:2] == [19, 0]
    far = training_alpha(0)[1000] * 3
    batch = scorer.score(np.stack([far, far]), [0, 1])
    np.testing.assert_array_equal(batch.p_values[:, 0], 1 / 20)
    np.testing.assert_array_equal(batch.p_value, 1 / 20)
    assert np.isinf(batch.critical).all() and not batch.anomalous.any() and not batch.tests.any()
    samples = batch.samples()
    assert samples == [batch.sample(0), batch.sample(1)] and [s.class_id for s in samples] == [0, 1]
    assert all(s.verdict == NORMAL and s.reasons == () for s in samples)


def test_a_verdict_no_single_test_reaches_names_the_strongest_test(store_dir, tmp_path):
    # Class 0's ranks edited by hand: every part-B image above any input on the three tests
    # (their p-values are 1) and below any input on the combined statistic (p = 1 / 501). The
    # verdict is ANOMALOUS with no test below the target: the reason is the test with the most
    # tail evidence. Class 1 (the fallback's ranks, untouched) names its test as usual.
    directory = tmp_path / "store"
    shutil.copytree(store_dir, directory)
    store = load_store(directory)
    fitted = calibrate(store, *held_out(), min_class_count=500, target_fpr=0.05)
    ranks = fitted.arrays["class_ranks"]
    assert fitted.section["classes"]["count"][0] == 500
    ranks[0, :3, :500], ranks[0, 3, :500] = 3e38, -3e38
    save_calibration(store, Calibration(fitted.section, fitted.arrays))
    scorer = Scorer(load_store(directory))
    low_beta, far = np.array([2, 4, -5000, -5000], np.float32), training_alpha(0)[1000]
    batch = scorer.score(np.stack([low_beta, 2 * far, 3 * far, 3 * far]), [0, 0, 0, 1])
    assert batch.anomalous.all()
    np.testing.assert_array_equal(batch.p_values[:3, :3], 1.0)
    np.testing.assert_array_equal(batch.p_value[:3], 1 / 501)
    reasons = [[(reason.code, reason.source) for reason in batch.sample(i).reasons] for i in range(4)]
    assert reasons[:3] == [[("low_beta", "class")], [("surprise", "class")], [("surprise", "class")]]
    assert reasons[3][0] == ("surprise", "fallback") and batch.p_values[3, 0] < 0.05


def test_a_batch_scores_like_its_rows(scorer):
    rng = np.random.default_rng(0)
    alpha = (rng.random((9, 4)) * [1200, 2400, 600, 120]).astype(np.float32)
    classes = rng.integers(0, 2, 9)
    batch = scorer.score(alpha, classes)
    assert len(batch) == 9 and batch.anomalous.dtype == bool
    for index in range(9):
        assert batch.sample(index) == scorer.score(alpha[index], classes[index]).sample(0)


def test_flags_and_their_sums_match_a_plain_loop(scorer):
    rng = np.random.default_rng(3)
    alpha = (rng.random((200, 4)) * [2600, 5200, 1300, 260] - [300, 600, 150, 30]).astype(np.float32)
    classes = rng.integers(0, 2, 200)
    batch = scorer.score(alpha, classes)
    reference = scorer.reference
    for flags, upper, lower, statistic in (
            (batch.surprising, alpha, reference.p_high[classes], 0),
            (batch.expected_missing, reference.p_low_expected[classes], alpha, 1)):
        mask = upper > lower
        np.testing.assert_array_equal(flags.mask(), mask)
        np.testing.assert_array_equal(flags.count, mask.sum(axis=1))
        exceedance = np.where(mask, (upper - lower) * reference.inverse_scale[classes], 0.0)
        np.testing.assert_allclose(batch.statistics[:, statistic], exceedance.sum(axis=1), rtol=1e-6)
    assert batch.surprise_count.sum() > 200 and batch.expectation_count.sum() > 30  # many rows flag several


def test_top_flags_break_ties_by_filter_and_keep_rows_apart():
    # Row 0 flags filters 1, 2, 5 (exceedances 2, 3, 3); row 1 none; row 2 flags filter 0.
    flags = Flags(entries=np.array([1, 2, 5, 12]), starts=np.array([0, 3, 3, 4]),
                  exceedance=np.array([2, 3, 3, 0.5], dtype=np.float32), num_filters=6)
    filters, exceedance = flags.top(2)
    assert filters.tolist() == [[2, 5], [-1, -1], [0, -1]]
    assert exceedance.tolist() == [[3, 3], [0, 0], [0.5, 0]]
    assert flags.count.tolist() == [3, 0, 1] and flags.filters(2).tolist() == [0]


def test_percentile_in_grid_matches_np_interp():
    rng = np.random.default_rng(1)
    grids = np.sort(np.round(rng.normal(size=(50, 101)), 1), axis=1)  # rounding makes ties
    values = rng.normal(scale=1.5, size=50)
    values[:3] = grids[:3, 40]  # exactly on a grid point
    expected = [np.interp(v, g, np.arange(101)) for v, g in zip(values, grids)]
    untied = [i for i in range(50) if len(np.unique(grids[i])) == 101 or not np.isin(values[i], grids[i])]
    np.testing.assert_allclose(percentile_in_grid(values, grids)[untied], np.array(expected)[untied], atol=1e-9)
    assert percentile_in_grid(np.array([-9.0, 9.0]), grids[:2]).tolist() == [0, 100]


def test_bad_input_is_named(scorer):
    cases = [
        ((PROBE[:3], 0), r"alpha must have 4 filter scores per input, got shape \(1, 3\)"),
        ((np.array([1, np.nan, 1, 1], np.float32), 0), r"alpha\[0\] contains NaN or infinite values"),
        ((np.array([1, np.inf, 1, 1], np.float32), 0), "NaN or infinite"),
        ((PROBE, 3), r"unknown class 3: class ids must be in \[0, 2\]"),
        ((PROBE, -1), "unknown class -1"),
        ((PROBE, 0.5), "integer class ids"),
        ((np.stack([PROBE, PROBE]), [0]), r"classes must be 2 integer class ids"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            scorer.score(*arguments)
    with pytest.raises(ValueError, match="^kind must be 'surprising' or 'expected_missing', got 'surprise'$"):
        scorer.score(PROBE, 0).flag_columns(0, "surprise")


def test_uncalibrated_or_shard_stores_are_not_scored(tmp_path):
    whole = build_store([(training_alpha(0), np.zeros(1001, int), STEPS)], tmp_path / "whole", META)
    with pytest.raises(StoreError, match="is not calibrated"):
        Scorer(load_store(whole))
    shard = build_store([(training_alpha(0), np.zeros(1001, int), STEPS)], tmp_path / "shard", META,
                        shard_index=0, num_shards=2)
    with pytest.raises(ValueError, match="is one shard; merge the shards before scoring"):
        calibrate(load_store(shard), training_alpha(0)[::10], np.zeros(101, int), min_class_count=1)
    store = load_store(whole)
    save_calibration(store, calibrate(store, training_alpha(0)[::10], np.zeros(101, int), min_class_count=1))
    manifest = load_store(whole).manifest
    for broken, message in ((dict(manifest["calibration"], classes={}), "malformed calibration"),
                            (dict(manifest["calibration"], classes=dict(manifest["calibration"]["classes"], source=["class"])),
                             "calibration does not cover its 3 classes")):
        rewritten = dict(manifest, calibration=broken)
        write_manifest(whole, dict(rewritten, sha256=store_sha256(rewritten)))  # hashed again: the scorer refuses it
        with pytest.raises(StoreError, match=message):
            Scorer(load_store(whole))
    # A calibrated manifest that says it is one shard (hand-made: calibrate refuses shards) is refused too.
    rewritten = dict(manifest, shard={"index": 0, "count": 2, "classes": [0, 3]})
    write_manifest(whole, dict(rewritten, sha256=store_sha256(rewritten)))
    with pytest.raises(StoreError, match=r"^distribution store .* is one shard; merge the shards before scoring$"):
        Scorer(load_store(whole))
    (whole / MANIFEST).unlink()


def test_the_store_sha256_covers_every_setting_a_verdict_depends_on(store_dir, tmp_path):
    directory = tmp_path / "store"
    shutil.copytree(store_dir, directory)
    calibrated(directory, min_class_count=500, target_fpr=0.05)
    manifest = load_store(directory).manifest
    section = manifest["calibration"]
    classes = section["classes"]
    edits = {
        "target rate": dict(manifest, calibration=dict(section, target_fpr=0.06)),
        "a class's group": dict(manifest, calibration=dict(section, classes=dict(classes, source=["fallback"] * 3))),
        "a class's rank count": dict(manifest, calibration=dict(section, classes=dict(classes, count=[499] + classes["count"][1:]))),
        "a critical value": dict(manifest, calibration=dict(section, fallback=dict(section["fallback"], critical=[1, 2, 3, 4]))),
        "training counts": dict(manifest, counts=[1001, 1000] + manifest["counts"][2:]),
    }
    assert all(edited != manifest for edited in edits.values())
    digests = {store_sha256(edited) for edited in edits.values()}
    assert len(digests) == len(edits) and manifest["sha256"] not in digests
    for name, edited in edits.items():
        write_manifest(directory, edited)
        with pytest.raises(StoreError, match="store sha256 does not match its arrays and settings"):
            load_store(directory)
    # The build time is not a setting: the same store, the same digest.
    later = dict(manifest, build_time="2030-01-01T00:00:00Z")
    assert store_sha256(later) == manifest["sha256"]
    write_manifest(directory, later)
    assert load_store(directory).sha256 == manifest["sha256"]


@pytest.mark.parametrize("num_filters", [4, 1])  # 1: fewer filters than the class has images
def test_exemplars_of_a_small_class_are_not_padded(tmp_path, num_filters):
    # Two training images per class and top_k 3: the third exemplar slot is empty (-1) in the store.
    alpha = np.array([[1, 0, 0, 0], [3, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2]], dtype=np.float32)[:, :num_filters]
    meta = StoreMeta("hand", "1", "layer4", {"size": [8, 8]}, ("zero", "one", "empty"), num_filters)
    store_dir = build_store([(alpha, np.array([0, 0, 1, 1]), np.array([7, 8, 9, 10]))], tmp_path / "small", meta, top_k=3)
    store = load_store(store_dir)
    np.testing.assert_array_equal(store.arrays["exemplars"][0, 0], [8, 7, -1])
    save_calibration(store, calibrate(store, alpha, np.array([0, 0, 1, 1]), min_class_count=1))
    scorer = Scorer(load_store(store_dir))
    flag = scorer.score(np.array([5, 0, 0, 0], np.float32)[:num_filters], 0).sample(0).surprising[0]
    assert flag.filter == 0 and flag.exemplars == (8, 7) and flag.alpha == 5.0
    reference = scorer.reference
    assert flag.exceedance == pytest.approx((5 - reference.p_high[0, 0]) * reference.inverse_scale[0, 0], rel=1e-6)


def test_flags_with_equal_exceedances_keep_filter_order(tmp_path):
    # 40 filters with the same training and held-out scores; the input exceeds their P99.9 by one
    # of two amounts. Ties are listed in filter order (more than 16 of them: numpy's default
    # sort orders ties arbitrarily past its insertion sort).
    steps = np.repeat(STEPS[:, None].astype(np.float32), 40, axis=1)
    store_dir = build_store([(steps, np.zeros(1001, int), STEPS)], tmp_path / "ties",
                            StoreMeta("ties", "1", "layer4", {}, ("only",), 40))
    store = load_store(store_dir)
    save_calibration(store, calibrate(store, steps[::2], np.zeros(501, int), min_class_count=1))
    alpha = np.tile(np.array([2000, 3000, 3000, 3000, 2000], np.float32), 8)
    batch = Scorer(load_store(store_dir)).score(alpha, 0)
    expected = np.flatnonzero(alpha == 3000).tolist() + np.flatnonzero(alpha == 2000).tolist()
    assert [flag.filter for flag in batch.sample(0).surprising] == expected
    assert [flag.filter for flag in batch.sample(0, max_flags=20).surprising] == expected[:20]


def test_silent_filters_still_weigh_when_they_fire():
    # Class 0: three of four filters silent (IQR 0): the floor is a tenth of the median positive
    # scale (2.0), not 0, so their exceedances count. Class 1 has no positive scale: it takes the
    # median positive scale of all classes (of 2, 1, 2, 3, 4: 2.0). Class 2 is ordinary.
    from explainserve.anomaly.reference import inverse_scale

    scale = np.array([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(inverse_scale(scale), [[5.0, 5.0, 5.0, 0.5], [5.0] * 4,
                                                      [1.0, 0.5, 1 / 3, 0.25]], rtol=1e-6)
    assert np.isfinite(inverse_scale(np.zeros((2, 3)))).all()


def test_an_input_far_above_a_mostly_silent_class_is_surprising(tmp_path):
    # Training and held-out alpha of class 0 are 0 on filters 0-2 (silent) and spread on filter 3.
    rng = np.random.default_rng(0)
    alpha = np.zeros((400, 4), dtype=np.float32)
    alpha[:, 3] = rng.random(400)
    classes = np.zeros(400, dtype=int)
    store_dir = build_store([(alpha[:300], classes[:300], np.arange(300))], tmp_path / "silent",
                            StoreMeta("s", "1", "l", {}, ("only",), 4))
    store = load_store(store_dir)
    save_calibration(store, calibrate(store, alpha[300:], classes[300:], target_fpr=0.05, min_class_count=1))
    result = Scorer(load_store(store_dir)).score(np.array([5.0, 5.0, 5.0, 0.5], np.float32), 0).sample(0)
    assert [flag.filter for flag in result.surprising] == [0, 1, 2]
    assert result.surprise > 0 and result.verdict == ANOMALOUS


def pooled_quantile(level, scale_zero, scale_one):
    """By hand: the level-quantile of the equal mixture of uniform [0, 1000 s0] and [0, 1000 s1]
    (each class's grid CDF is exactly uniform: its percentiles are linear in the level)."""
    low, high = sorted((1000 * scale_zero, 1000 * scale_one))
    if level <= 0.5 + 0.5 * low / high:  # below the shorter range both classes contribute
        return level / (0.5 / low + 0.5 / high)
    return high * (2 * level - 1)


def test_a_class_without_training_images_holds_the_pooled_distribution(store_dir):
    store = load_store(store_dir)
    assert store.counts.tolist() == [1001, 1001, 0] and store.manifest["pooled"]["classes"] == [2]
    np.testing.assert_allclose(store.arrays["mean"][2], 250 * (SCALES[0] + SCALES[1]), rtol=1e-6)
    for name, level in (("p_high", 0.999), ("p_low", 0.001)):
        expected = [pooled_quantile(level, *SCALES[:, n]) for n in range(4)]
        np.testing.assert_allclose(store.arrays[name][2], expected, rtol=2e-3)  # f0: 998 and 0.1818
    # Both classes' β run over 0.9 x (i - 500): so does the pooled β (the class means of means agree).
    np.testing.assert_allclose(store.arrays["beta_grid"][2], 0.9 * (10 * np.arange(101) - 500), atol=0.05)
    assert (store.arrays["exemplars"][2] == -1).all() and np.isfinite(store.arrays["grid"][2]).all()


def test_a_class_without_training_images_scores_against_the_pool_by_hand(store_dir):
    scorer = calibrated(store_dir, min_class_count=500, target_fpr=0.05)
    section = scorer.store.calibration["classes"]
    assert section["source"] == ["class", "fallback", "pooled"] and section["count"][2] == 750
    # Scales of the pooled rows: the IQR of every part-A image (even positions within each class).
    alpha, classes = held_out()
    part_a = np.concatenate([np.flatnonzero(classes == c)[::2] for c in (0, 1)])
    upper, lower = np.percentile(alpha[part_a].astype(np.float64), [75, 25], axis=0)
    np.testing.assert_allclose(scorer.store.arrays["scale"][2], upper - lower, rtol=1e-6)

    result = scorer.score(PROBE, 2).sample(0)
    # Pooled P99.9 of f0 is 998 < 999.5; f2's 0.4 is below its pooled P0.1 (0.8) and its pooled mu
    # (625) is above the mean of the pooled mus (450); f1's 1.5 is above its P0.1 (0.8).
    assert [f.filter for f in result.surprising] == [0] and [f.filter for f in result.expected_missing] == [2]
    assert result.surprising[0].threshold == pytest.approx(998, rel=1e-3) and result.surprising[0].exemplars == ()
    expected_beta = PROBE.astype(np.float64).mean() - 450
    assert result.beta == pytest.approx(expected_beta, rel=1e-5)
    assert result.beta_z == pytest.approx(expected_beta / 450, rel=1e-3)  # median 0, IQR 0.9 x 500

    # The verdict's p-value: rank among the 750 part-B images, whatever their class, scored against the pool.
    part_b = np.concatenate([np.flatnonzero(classes == c)[1::2] for c in (0, 1)])
    ranked = np.sort(scorer.score(alpha[np.sort(part_b)], np.full(len(part_b), 2)).statistics[:, 3])
    np.testing.assert_array_equal(scorer.store.arrays["class_ranks"][2, 3, :750], ranked)
    value, ranked = float(np.float32(result.score)), ranked.astype(np.float64)
    below = int((ranked < value).sum())
    rank = below - 1 + (value - ranked[below - 1]) / (ranked[below] - ranked[below - 1]) if 0 < below < 750 else None
    expected_p = 1.0 if below == 0 else 1 / 751 if below == 750 else (750 - rank) / 751
    assert result.p_value == pytest.approx(expected_p, rel=1e-9)
    far = scorer.score(np.array([5000, 0, 0, 5000], np.float32), 2).sample(0)
    assert far.verdict == ANOMALOUS and far.p_value == pytest.approx(1 / 751)
    assert {reason.source for reason in far.reasons} == {"pooled"}
    # Its tail model is fitted on the part-A images scored against the pool, with the held-out scales.
    part_a_tests = scorer.score(alpha[np.sort(part_a)], np.full(len(part_a), 2)).statistics[:, :3]
    assert (part_a_tests[:, :2] > 0).any()  # some images cross a threshold, so the scales matter
    np.testing.assert_allclose(scorer.store.arrays["tail_grid"][2], fit_tail_grid(part_a_tests), rtol=1e-6)


def test_recalibration_does_not_read_the_previous_calibration(store_dir, tmp_path):
    # The same held-out images calibrate a store the same way whatever calibration it held
    # before: here one fitted on images spread 3x as wide, whose scales are 3x the new ones.
    # The pooled group scores its images with the new scales too.
    alpha, classes = held_out()
    fresh = calibrate(load_store(store_dir), alpha, classes, min_class_count=500, target_fpr=0.05)
    directory = tmp_path / "store"
    shutil.copytree(store_dir, directory)
    store = load_store(directory)
    save_calibration(store, calibrate(store, 3 * alpha, classes, min_class_count=500, target_fpr=0.05))
    store = load_store(directory)
    np.testing.assert_allclose(store.arrays["scale"][2], 3 * fresh.arrays["scale"][2], rtol=1e-5)
    again = calibrate(store, alpha, classes, min_class_count=500, target_fpr=0.05)
    assert again.section == fresh.section
    for name, array in fresh.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array, err_msg=name)


def test_mixture_quantiles_invert_the_mixture_cdf():
    rng = np.random.default_rng(3)
    grids = np.cumsum(rng.exponential(size=(5, 11, 7)), axis=1) - rng.normal(scale=3, size=(5, 1, 7))
    levels = np.asarray(PERCENTILE_LEVELS) / 100
    weights = rng.dirichlet(np.ones(5))
    targets = np.array([0.001, 0.01, 0.25, 0.5, 0.9, 0.999])
    quantiles = mixture_quantiles(grids, levels, weights, targets)
    for m in range(7):  # strictly increasing grids: np.interp is each component's CDF
        cdf = [sum(w * np.interp(q, grids[c, :, m], levels) for c, w in enumerate(weights)) for q in quantiles[:, m]]
        np.testing.assert_allclose(cdf, targets, atol=1e-9)
    np.testing.assert_array_equal(mixture_quantiles(grids, levels, weights, np.array([0.0, 1.0])),
                                  [grids[:, 0].min(axis=0), grids[:, -1].max(axis=0)])
    # A point mass at 1 (a class of one image) mixed half and half with uniform [0, 4]:
    # F(v) = v / 8 below 1, jumps from 0.125 to 0.625 at 1, then 0.5 + v / 8.
    point_and_uniform = np.stack([np.ones(11), 4 * levels])[:, :, None]
    quantiles = mixture_quantiles(point_and_uniform, levels, np.array([0.5, 0.5]), np.array([0.1, 0.125, 0.3, 0.625, 0.7]))
    np.testing.assert_allclose(quantiles[:, 0], [0.8, 1.0, 1.0, 1.0, 1.6], rtol=1e-12)


def test_a_store_without_a_pooled_row_refuses_the_empty_class(store_dir):
    store = load_store(store_dir)
    store.arrays["mean"] = np.where(np.arange(3)[:, None] == 2, np.nan, store.arrays["mean"])  # as an older build
    with pytest.raises(ValueError, match="class 2 has no training images in the distribution store and the store "
                                         "holds no pooled distribution"):
        ClassReference(store).check(PROBE, 2)
