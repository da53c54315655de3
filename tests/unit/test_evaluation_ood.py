import numpy as np
import pytest

from explainserve.evaluation.ood import (auroc, auroc_bootstrap_interval, auroc_standard_error, energy_score,
                                         flagged_rate, logsumexp, max_logit_score, msp_score, threshold_at_fpr)


def test_auroc_of_separated_reversed_and_tied_scores():
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0
    assert auroc([5.0] * 4, [5.0] * 3) == 0.5


def test_auroc_counts_a_tie_as_one_half():
    # Pairs (out, in): (1, 0) 1, (1, 1) 1/2, (2, 0) 1, (2, 1) 1 -> 3.5 / 4.
    assert auroc([0.0, 1.0], [1.0, 2.0]) == pytest.approx(0.875)
    # Integer counts with many ties: in [0, 0, 1, 2], out [0, 2, 3].
    # out 0: 0 + 0.5 + 0.5 = 1 of 4; out 2: 1 + 1 + 1 + 0.5 = 3.5; out 3: 4 -> 8.5 / 12.
    assert auroc([0, 0, 1, 2], [0, 2, 3]) == pytest.approx(8.5 / 12)


def test_auroc_matches_sklearn_on_random_tied_scores():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    negatives, positives = rng.integers(0, 6, 300), rng.integers(1, 8, 200)
    expected = metrics.roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[negatives, positives])
    assert auroc(negatives, positives) == pytest.approx(expected, abs=1e-12)


def test_auroc_refuses_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="out_scores"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match="in_scores"):
        auroc([np.nan], [1.0])


def test_auroc_standard_error_by_hand():
    # A = 0.5: Q1 = Q2 = 1/3, var = (1/4 + 9 * (1/3 - 1/4) + 9 * (1/3 - 1/4)) / 100 = 1.75 / 100.
    assert auroc_standard_error(0.5, 10, 10) == pytest.approx(np.sqrt(0.0175))
    assert auroc_standard_error(1.0, 10, 10) == 0.0
    assert auroc_standard_error(0.8, 4000, 2000) < auroc_standard_error(0.8, 40, 20)


def test_threshold_flags_at_most_the_target_rate():
    in_scores = np.arange(100.0)  # 0..99
    threshold = threshold_at_fpr(in_scores, 0.01)
    assert threshold == 98.0  # only 99 is above it
    assert flagged_rate(in_scores, threshold) == 0.01
    assert flagged_rate([97.0, 98.0, 98.5, 120.0], threshold) == 0.5
    assert threshold_at_fpr(in_scores, 0.05) == 94.0


def test_threshold_with_ties_stays_under_the_target():
    # 95 zeros and five ones: flagging the ones would be 5 %, over a 1 % target.
    in_scores = np.r_[np.zeros(95), np.ones(5)]
    threshold = threshold_at_fpr(in_scores, 0.01)
    assert threshold == 1.0
    assert flagged_rate(in_scores, threshold) == 0.0
    assert flagged_rate([0, 1, 2, 3], threshold) == 0.5
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr(in_scores, 0.0)


def test_logit_baselines_by_hand():
    logits = np.array([[0.0, 0.0], [2.0, 0.0], [1000.0, 999.0]])
    assert logsumexp(logits) == pytest.approx([np.log(2), 2 + np.log(1 + np.exp(-2)), 1000 + np.log(1 + np.exp(-1))])
    assert msp_score(logits) == pytest.approx([-0.5, -1 / (1 + np.exp(-2)), -1 / (1 + np.exp(-1))])
    assert max_logit_score(logits) == pytest.approx([0.0, -2.0, -1000.0])
    assert energy_score(logits) == pytest.approx(-logsumexp(logits))
    # T = 2: -2 * log(exp(0) + exp(0)) for the first row.
    assert energy_score(logits, temperature=2.0)[0] == pytest.approx(-2 * np.log(2))
    with pytest.raises(ValueError, match="logits"):
        msp_score([1.0, 2.0])


def test_report_section_is_replaced_in_place_or_appended():
    from bench.eval_ood import HEADING, splice

    new = [HEADING, "", "new numbers"]
    assert splice("# report\n\n## Table 6\nrows\n", new) == f"# report\n\n## Table 6\nrows\n\n{HEADING}\n\nnew numbers\n"
    middle = f"# report\n\n{HEADING}\n\nold\n\n## Later\nkept\n"
    assert splice(middle, new) == f"# report\n\n{HEADING}\n\nnew numbers\n## Later\nkept\n"
    last = f"# report\n\n{HEADING}\n\nold\n### Reading\n\nold notes\n"
    assert splice(last, new) == f"# report\n\n{HEADING}\n\nnew numbers\n"



def test_summary_lines_count_over_the_sets_and_name_the_table():
    from bench.eval_ood import VERDICT, summary_lines

    results = {"sets": ["noise", "blur", "inversion"], "best_of": 1, "tpr_vs_energy": 2,
               "table": {VERDICT: {"test_fpr": 0.00755}}}
    assert summary_lines(results) == ["verdict_auroc_best_of=1/3", "verdict_tpr_at_target_ge_energy=2/3",
                                      "realised_fpr_test_percent=0.76"]
    assert summary_lines(results, prefix="video_")[2] == "video_realised_fpr_test_percent=0.76"

def test_bootstrap_interval_covers_the_auroc_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    intervals = []
    for n in (100, 3000):
        negatives, positives = rng.normal(size=n), rng.normal(0.5, size=n)
        low, high = auroc_bootstrap_interval(negatives, positives, resamples=200)
        assert low < auroc(negatives, positives) < high
        # About +-1.96 Hanley-McNeil standard errors.
        width = 2 * 1.96 * auroc_standard_error(auroc(negatives, positives), n, n)
        assert 0.7 * width < high - low < 1.3 * width, (n, high - low, width)
        intervals.append(high - low)
    assert intervals[1] < intervals[0] / 3  # about sqrt(30) narrower
    assert auroc_bootstrap_interval([0.0, 1.0], [2.0, 3.0], resamples=20) == (1.0, 1.0)
    with pytest.raises(ValueError, match="resamples >= 2"):
        auroc_bootstrap_interval([0.0], [1.0], resamples=1)


def test_feature_baselines_see_the_models_own_head():
    """ReAct with nothing clipped and ASH with nothing pruned are Energy on the model's logits,
    so the head they are given is the model's (mean-pool then linear), on real feature maps."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_ood")
    from bench.ood_baselines import FeatureBaselines
    from explainserve.models.architectures import FashionVGG

    torch.manual_seed(0)
    model = FashionVGG().eval()
    with torch.no_grad():
        maps = model.features(torch.randn(80, 3, 32, 32))
        logits = model.classifier(model.pool(maps).flatten(1))
    features = maps.flatten(2).mean(dim=2).numpy()
    baselines = FeatureBaselines(model.classifier, features, np.arange(80) % 8, maps)
    baselines.react.threshold = float("inf")
    baselines.ash.percentile = 0.0
    scores = baselines.scores(maps)
    expected = energy_score(logits.double().numpy())
    np.testing.assert_allclose(scores["ReAct+Energy"], expected, rtol=1e-5)
    assert set(scores) == {"KNN", "ViM", "Mahalanobis", "ReAct+Energy", "ASH-S", "CARef", "CADRef"}
    # KNN: the distance of each unit-normalised feature to its 50th nearest training feature
    # (itself first, at distance 0).
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = np.sort(np.linalg.norm(unit[:, None] - unit[None], axis=2), axis=1)
    np.testing.assert_allclose(scores["KNN"], distances[:, 49], rtol=1e-4, atol=1e-6)


def test_caref_and_cadref_by_hand():
    """bench/ood_baselines.py RelativeFeatures on a two-class, two-feature head worked out on
    paper: class means over the fitting images *predicted* as each class (not labelled), the L1
    deviation over |z|_1, and CADRef's split by the signs of the predicted class's weights, the
    part along them over the input's energy, the rest over the fitting images' mean energy."""
    from bench.ood_baselines import RelativeFeatures

    weight, bias = np.array([[1.0, -1.0], [0.0, 1.0]]), np.zeros(2)
    # logits (2, 0), (4, 0): class 0; (-2, 2), (-4, 4): class 1; (0.5, 0.5) ties, arg-max takes class 0
    fitting = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [0.0, 4.0], [1.0, 0.5]])
    relative = RelativeFeatures(weight, bias, fitting)
    np.testing.assert_allclose(relative.class_means, [[7 / 3, 1 / 6], [0.0, 3.0]])
    energies = [np.log(np.exp(2) + 1), np.log(np.exp(4) + 1), np.log(np.exp(-2) + np.exp(2)),
                np.log(np.exp(-4) + np.exp(4)), np.log(2 * np.exp(0.5))]
    assert relative.mean_logit_score == pytest.approx(np.mean(energies))
    # z = (1, 1): logits (0, 1), class 1, m = (0, 3): e = (1, -2), |e|_1 = 3, |z|_1 = 2.
    # Signs of w_1 = (0, +1): the first feature is in neither part; -2 is against the sign.
    # z = (3, 1): logits (2, 1), class 0, m = (7/3, 1/6): e = (2/3, 5/6), |z|_1 = 4; signs (+, -):
    # 2/3 along, 5/6 against.
    scores = relative.scores(np.array([[1.0, 1.0], [3.0, 1.0]]))
    np.testing.assert_allclose(scores["CARef"], [3 / 2, (2 / 3 + 5 / 6) / 4])
    np.testing.assert_allclose(scores["CADRef"], [0 / np.log(1 + np.e) + (2 / 2) / np.mean(energies),
                                                  (2 / 3 / 4) / np.log(np.exp(2) + np.e) + (5 / 6 / 4) / np.mean(energies)])


def test_a_class_no_fitting_image_is_predicted_as_takes_the_mean_of_them_all():
    from bench.ood_baselines import RelativeFeatures

    relative = RelativeFeatures(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), np.zeros(3),
                                np.array([[3.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(relative.class_means, [[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]])


def test_the_caref_verdict_takes_the_served_tests_and_the_relative_deviation_by_hand():
    """bench/ood_caref_verdict.py: the five served statistics (not the combined one) and
    |z - m_c|_1 / |z|_1 against the class each row was scored against."""
    from types import SimpleNamespace

    from bench.ood_caref_verdict import caref_tests, relative_deviation

    means = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    features = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    classes = np.array([0, 1, 0])
    np.testing.assert_allclose(relative_deviation(features, means, classes), [0.0, 2 / 4, 2 / 2])
    statistics = np.arange(18, dtype=np.float32).reshape(3, 6)  # five tests, then combined
    tests = caref_tests(SimpleNamespace(statistics=statistics, classes=classes), features, means)
    assert tests.dtype == np.float32 and tests.shape == (3, 6)
    np.testing.assert_array_equal(tests[:, :5], statistics[:, :5])
    np.testing.assert_allclose(tests[:, 5], [0.0, 0.5, 1.0])


def test_the_verdict_with_an_energy_test_holds_its_rate_and_sees_an_energy_shift():
    """bench/ood_extended.py: four tests calibrated like the verdict's three (own groups for the
    store's own classes, the class-independent group for the rest) keep the target rate on
    exchangeable inputs in every group, and flag inputs whose fourth test alone moved."""
    from bench.ood_extended import ExtendedVerdict

    rng = np.random.default_rng(0)

    def draw(n):
        tests = rng.standard_normal((n, 4)).astype(np.float32)
        tests[:, 0] = np.maximum(tests[:, 0], 0)  # an atom at 0, as the surprise statistic has
        return tests, rng.integers(0, 3, n)

    own = np.array([True, True, False])
    verdict = ExtendedVerdict(*draw(6000), own, 0.05)
    tests, classes = draw(40000)
    combined, flags = verdict.score(tests, classes)
    for group in range(3):
        assert abs(flags[classes == group].mean() - 0.05) < 0.015, group
    shifted = tests.copy()
    shifted[:, 3] += 3
    shifted_combined, shifted_flags = verdict.score(shifted, classes)
    assert shifted_flags.mean() > 0.5 and (shifted_combined >= combined).all()


def test_the_fisher_verdict_holds_its_rate_and_adds_evidence_spread_over_its_tests():
    """bench/ood_extended.py FisherVerdict: the summed tail evidence, calibrated like the min-p
    verdict, keeps the target rate in every group; a small shift of every test at once is
    flagged more often than by the min-p combination, and one large shift of a single test less
    (each combination wins where it should)."""
    from bench.ood_extended import ExtendedVerdict, FisherVerdict
    from explainserve.anomaly.conformal import tail_evidence

    rng = np.random.default_rng(1)

    def draw(n):
        return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n)

    own = np.array([True, True, False])
    calibration = draw(8000)
    fisher, min_p = FisherVerdict(*calibration, own, 0.05), ExtendedVerdict(*calibration, own, 0.05)
    tests, classes = draw(40000)
    combined, flags = fisher.score(tests, classes)
    for group in range(3):
        assert abs(flags[classes == group].mean() - 0.05) < 0.015, group
    groups = np.where(own[classes], classes, 3)
    np.testing.assert_allclose(combined, tail_evidence(tests, fisher.grids[groups]).sum(axis=1), rtol=1e-6)
    spread = tests + 1.0
    assert fisher.score(spread, classes)[1].mean() > min_p.score(spread, classes)[1].mean() + 0.05
    single = tests.copy()
    single[:, 0] += 3.0
    assert fisher.score(single, classes)[1].mean() < min_p.score(single, classes)[1].mean() - 0.05


def test_exact_mcnemar_p_by_hand():
    from explainserve.evaluation.ood import exact_mcnemar_p

    assert exact_mcnemar_p(0, 0) == 1.0
    assert exact_mcnemar_p(0, 2) == 0.5  # 2 x (1/4)
    assert exact_mcnemar_p(3, 3) == 1.0
    assert exact_mcnemar_p(8, 0) == exact_mcnemar_p(0, 8) == 2 / 256
    assert exact_mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        exact_mcnemar_p(-1, 3)


def test_exact_mcnemar_p_equals_scipys_binomial_test():
    from explainserve.evaluation.ood import exact_mcnemar_p

    stats = pytest.importorskip("scipy.stats")  # scikit-image's dependency
    for only_first, only_second in [(0, 5), (2, 7), (13, 13), (30, 12), (1, 40)]:
        expected = stats.binomtest(only_first, only_first + only_second, 0.5).pvalue
        assert exact_mcnemar_p(only_first, only_second) == pytest.approx(expected, rel=1e-12)
