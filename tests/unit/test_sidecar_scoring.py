"""The gateway's store folder (AnomalyScoring) without any process: which folders are stores,
which model and version each may score, and the health it reports."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import zipfile

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from explainserve._generated import explain_pb2
from explainserve.anomaly import ANOMALOUS, Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.conformal import TESTS
from explainserve.anomaly.feature_tests import FEATURE_TESTS
from explainserve.anomaly.scorer import MAX_FLAGS
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.sidecar.metrics import GatewayMetrics
from explainserve.anomaly.top_flags import top_flags
from explainserve.client import ColumnScores, columns_request, score_request
from explainserve.inputs import InputTooLarge
from explainserve.commands.serve import store_warnings
from explainserve.sidecar.columns import MAX_COLUMN_VALUES, columns_response, parse_columns, score_columns, varint
from explainserve.sidecar.scoring import AnomalyScoring, class_verdict
from support.pooled_features import pooled_features

MODEL, FILTERS = "demo_image", 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A calibrated store of 3 synthetic classes for MODEL version 1.0."""
    synthetic = SyntheticClasses.random(3, FILTERS)
    meta = dataclasses.replace(synthetic.meta, model_name=MODEL, model_version="1.0")
    folder = build_store(synthetic.batches(200, batch_size=100), tmp_path_factory.mktemp("store") / MODEL, meta,
                         top_k=2, build_time="2026-01-01T00:00:00Z")
    classes = np.tile(np.arange(3), 100)
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(classes, seed=99), classes,
                                                   min_class_count=1))
    return folder


def test_store_folder_rules(store, tmp_path):
    stores = tmp_path / "stores"
    shutil.copytree(store, stores / MODEL)
    shutil.copytree(store, stores / "renamed")  # its manifest names demo_image
    (stores / ".shards").mkdir()
    (stores / "README").write_text("not a store")
    scoring = AnomalyScoring(GatewayMetrics(), stores)
    scoring.load()
    assert sorted(scoring.slots) == [MODEL, "renamed"] and not scoring.healthy
    refused = scoring.score("renamed", np.zeros(FILTERS, np.float32), 0)
    assert refused.status == explain_pb2.AnomalyReport.UNAVAILABLE
    assert refused.reason.startswith("store mismatch: ") and "built for model 'demo_image'" in refused.reason
    # a wrong alpha from a handler is never an error of the request
    wrong = scoring.score(MODEL, np.zeros(FILTERS // 2, np.float32), 0)
    assert wrong.status == explain_pb2.AnomalyReport.UNAVAILABLE and wrong.reason.startswith("scoring failed: ")
    assert scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0, version="1.0").status == explain_pb2.AnomalyReport.OK
    assert "version '1.0', not '7'" in scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0, version="7").reason

    shutil.rmtree(stores / "renamed")
    healthy = AnomalyScoring(GatewayMetrics(), stores)
    changes = []
    healthy.on_health_change(changes.append)
    healthy.load()
    assert healthy.healthy
    healthy.model_served(MODEL, "1.0")
    assert healthy.healthy and changes == []
    healthy.model_served(MODEL, "1.1")  # TorchServe serves another version: refused
    assert not healthy.healthy and changes == [False]
    assert not AnomalyScoring(GatewayMetrics(), None).healthy  # nothing to score with


def test_a_store_built_at_another_layer_or_normalisation_than_served_is_refused(store, tmp_path):
    stores = tmp_path / "stores"
    shutil.copytree(store, stores / MODEL)
    meta = load_store(store).meta
    fits = {"layer": meta.layer, "num_filters": FILTERS, "input_size": [224, 224], "mean": [0.5] * 3, "std": [0.25] * 3}
    scoring = AnomalyScoring(GatewayMetrics(), stores)
    changes = []
    scoring.on_health_change(changes.append)
    scoring.load()
    scoring.model_served(MODEL, "1.0", fits)
    assert scoring.healthy and changes == []
    # The archive rebuilt after the store: layer3 of 8 filters, another normalisation.
    scoring.model_served(MODEL, "1.0", {**fits, "layer": "layer3", "num_filters": 8, "mean": [0.485, 0.456, 0.406]})
    assert not scoring.healthy and changes == [False]
    refused = scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0)
    assert refused.status == explain_pb2.AnomalyReport.UNAVAILABLE
    assert refused.reason == (
        f"store mismatch: distribution store {stores / MODEL}: built on model '{MODEL}' at layer 'layer4', not 'layer3'; "
        "num_filters 16, not 8; mean [0.5, 0.5, 0.5], not [0.485, 0.456, 0.406], as TorchServe's handler explains it "
        "(the archive changed after the store was built): its verdicts would mean nothing; rebuild the store from "
        "the served archive")
    # ... and stays refused when the folder is verified again
    scoring.reload(force=True)
    assert scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0).reason == refused.reason
    # A store with no input_size recorded (this synthetic one records "size") is compared on the rest.
    assert meta.misfits({"input_size": [32, 32]}) == []
    # `explainserve serve` says so before it starts the gateway, from the archive's metadata.
    model_store = tmp_path / "model_store"
    model_store.mkdir()
    with zipfile.ZipFile(model_store / f"{MODEL}.mar", "w") as archive:
        archive.writestr("metadata.json", json.dumps({"layer": "layer3", "input_size": [64, 64], "mean": [0.5] * 3,
                                                      "std": [0.25] * 3}))
    warnings = store_warnings(stores, [MODEL], model_store)
    assert warnings[-1] == (f"distribution store of {MODEL}: built at layer 'layer4', not 'layer3', as {MODEL}.mar "
                            f"explains the model: the gateway refuses it (store mismatch); rebuild it with explainserve "
                            f"build-distributions --model {model_store / MODEL}.mar")
    assert not any("layer" in warning for warning in store_warnings(stores, [MODEL]))  # no archives given


def test_a_store_that_can_never_flag_is_logged_and_exported(store, tmp_path, caplog):
    # The fixture's classes rank their own 50 part-B images each: p-values never go below 1/51.
    stores = tmp_path / "stores"
    shutil.copytree(store, stores / MODEL)
    metrics = GatewayMetrics()
    scoring = AnomalyScoring(metrics, stores)
    with caplog.at_level(logging.WARNING, logger="explainserve.sidecar.scoring"):
        scoring.load()
    never = metrics.registry.get_sample_value("explainserve_store_classes_never_anomalous", {"model": MODEL})
    assert never == 3 and scoring.healthy
    served = scoring.score(MODEL, np.full(FILTERS, 1e6, np.float32), 1).predicted  # far past every training image
    assert served.verdict == explain_pb2.ClassVerdict.NORMAL and served.smallest_p_value == 1 / 51 == served.p_value
    assert ("can never be ANOMALOUS at the 1.00% target for 3 of 3 classes (class0, class1, class2): their groups "
            "rank only 50 part-B validation samples") in caplog.text
    assert "calibrate to a target above 1.96% (explainserve recalibrate-distributions)" in caplog.text
    # `explainserve serve` prints the same before it starts the gateway; a folder that is no store is left to the gateway
    (stores / "broken").mkdir()
    (warning,) = store_warnings(stores, [MODEL, "broken"])
    assert warning.startswith(f"distribution store of {MODEL}: the verdict can never be ANOMALOUS at the 1.00% target")
    # Recalibrated on 200 part-B images a class, every class can be flagged: 0, and no warning.
    synthetic = SyntheticClasses.random(3, FILTERS)
    classes = np.tile(np.arange(3), 400)
    folder = stores / MODEL
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(classes, seed=98), classes))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="explainserve.sidecar.scoring"):
        scoring.reload()
    assert metrics.registry.get_sample_value("explainserve_store_classes_never_anomalous", {"model": MODEL}) == 0
    assert "can never be ANOMALOUS" not in caplog.text and store_warnings(stores, [MODEL]) == []
    shutil.rmtree(folder)
    scoring.reload()
    assert metrics.registry.get_sample_value("explainserve_store_classes_never_anomalous", {"model": MODEL}) is None


def verdict_built_message_by_message(scores, row: int) -> explain_pb2.ClassVerdict:
    """Row ``row`` of ``scores`` as a ClassVerdict built from ``sample()`` with one message per
    flag, reason and verdict: the straightforward construction the served one must equal."""
    sample = scores.sample(row, max_flags=MAX_FLAGS)
    verdict = explain_pb2.ClassVerdict

    def flags(found) -> list:
        return [explain_pb2.FilterFlag(filter=f.filter, alpha=f.alpha, threshold=f.threshold, exemplars=f.exemplars,
                                       exceedance=f.exceedance) for f in found]

    with_features = {} if sample.feature_mahalanobis is None else {
        "feature_mahalanobis": sample.feature_mahalanobis, "feature_residual": sample.feature_residual}
    return verdict(
        **with_features,
        class_index=sample.class_id, class_name=sample.class_name,
        verdict=verdict.ANOMALOUS if sample.verdict == ANOMALOUS else verdict.NORMAL,
        beta=sample.beta, beta_percentile=sample.beta_percentile, beta_z=sample.beta_z, score=sample.score,
        p_value=sample.p_value, target_fpr=scores.scorer.target_fpr, surprise=sample.surprise, missing=sample.missing,
        reasons=[explain_pb2.VerdictReason(code=r.code, value=r.value, threshold=r.threshold, source=r.source,
                                           p_value=r.p_value,
                                           features=[explain_pb2.FeatureShare(feature=f.feature, share=f.share)
                                                     for f in r.features])
                 for r in sample.reasons],
        surprise_count=int(scores.surprise_count[row]), expectation_count=int(scores.expectation_count[row]),
        surprising_filters=flags(sample.surprising), missing_filters=flags(sample.expected_missing),
        pooled_distribution=bool(scores.scorer.reference.pooled[sample.class_id]),
        smallest_p_value=sample.smallest_p_value,
    )


@pytest.fixture(scope="module", params=["alpha", "features"])
def varied(request, tmp_path_factory):
    """BatchScores of 48 rows of a calibrated 4-class, 40-filter store: a row with every filter
    flagged (more than MAX_FLAGS), NORMAL and ANOMALOUS rows; class 1 has 2 training images for
    4 exemplars (padded ids left out), class 2 none (the pooled distribution)."""
    classes_count, filters = 4, 40
    synthetic = SyntheticClasses.random(classes_count, filters, seed=6)
    meta = dataclasses.replace(synthetic.meta, model_name=MODEL)

    def training():
        seen_in_class_1 = 0
        for alpha, classes, ids in synthetic.batches(60, batch_size=40):
            keep = classes != 2
            for index in np.flatnonzero(classes == 1):
                seen_in_class_1 += 1
                keep[index] = seen_in_class_1 <= 2
            yield alpha[keep], classes[keep], ids[keep]

    folder = build_store(training(), tmp_path_factory.mktemp("varied") / MODEL, meta, top_k=4,
                         build_time="2026-01-01T00:00:00Z")
    # The feature tests rank part B among the class's images only: 40 of them reach p < 0.05.
    held_out = np.repeat(np.arange(classes_count), 80 if request.param == "features" else 30)
    features = pooled_features(held_out, 5, filters) if request.param == "features" else None
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(held_out, seed=5), held_out,
                                                   features=features, target_fpr=0.05, min_class_count=1))
    scorer = Scorer(load_store(folder))
    assert scorer.has_feature_tests == (features is not None)
    rng = np.random.default_rng(0)
    classes = np.tile(np.arange(classes_count), 12)
    alpha = synthetic.sample(classes, seed=1) * rng.choice([1.0, 1.5, 4.0, -2.0], size=(len(classes), 1))
    alpha[0] = scorer.reference.p_high[0] + 1.0  # every filter surprising
    scored = None
    if features is None:
        scores = scorer.score(alpha.astype(np.float32), classes)
    else:  # some rows far from the held-out features, so that the feature tests fire
        scored = pooled_features(classes, 1, filters) * rng.choice([1.0, 1.0, 3.0], size=(len(classes), 1))
        scored[1::7] += 2.0 * rng.normal(size=(len(scored[1::7]), filters)).astype(np.float32)
        scores = scorer.score(alpha.astype(np.float32), classes, features=scored)
        fired = scores.tests[:, len(TESTS):]
        assert scores.test_names == TESTS + FEATURE_TESTS and fired[:, 0].any() and fired[:, 1].any()
    assert scores.surprise_count.max() == filters > MAX_FLAGS and scores.anomalous.any() and not scores.anomalous.all()
    assert scorer.reference.pooled[2] and scorer.reference.counts[1] == 2
    return scores, scored


@pytest.fixture(scope="module")
def varied_scores(varied):
    """The BatchScores of ``varied``: scored with alpha alone, or with features too."""
    return varied[0]


def test_served_verdicts_equal_the_samples_field_for_field(varied_scores):
    scores, classes = varied_scores, varied_scores.classes
    for row in range(len(classes)):
        expected = verdict_built_message_by_message(scores, row)
        assert class_verdict(scores, row) == expected, row
        report = explain_pb2.AnomalyReport()
        assert class_verdict(scores, row, into=report.label) is report.label and report.label == expected
        assert class_verdict(scores, row).SerializeToString() == expected.SerializeToString()
    padded = [flag for row in np.flatnonzero(classes == 1) for flag in class_verdict(scores, row).surprising_filters]
    assert padded and all(len(flag.exemplars) == 2 for flag in padded)
    assert any(class_verdict(scores, row).reasons for row in range(len(classes)))
    # A feature test's reason lists its features, largest term first, as the library's terms say;
    # the alpha tests' reasons list none.
    reasons = [(row, reason) for row in range(len(classes)) for reason in class_verdict(scores, row).reasons]
    assert all(not reason.features for _, reason in reasons if reason.code in TESTS)
    featured = [(row, reason) for row, reason in reasons if reason.code in FEATURE_TESTS]
    assert {reason.code for _, reason in featured} == (set(FEATURE_TESTS) if scores.features is not None else set())
    tests = scores.scorer.feature_tests
    for row, reason in featured:
        terms = (tests.mahalanobis_terms(scores.features[row:row + 1], scores.classes[row:row + 1])
                 if reason.code == "feature_mahalanobis" else tests.residual_terms(scores.features[row:row + 1]))[0]
        assert len(reason.features) == MAX_FLAGS and reason.features[0].feature == int(terms.argmax())
        assert [f.share for f in reason.features] == pytest.approx(sorted(terms, reverse=True)[:MAX_FLAGS], rel=1e-9)
    unflagged = scores.sample(0, max_flags=0)  # what class_verdict reads besides the flag columns
    assert unflagged.surprising == unflagged.expected_missing == () and unflagged.p_value == scores.sample(0).p_value
    with pytest.raises(ValueError, match="kind must be 'surprising' or 'expected_missing', got 'surprise'"):
        scores.flag_columns(0, "surprise")


def columns_built_from_lists(scores, flags: int) -> explain_pb2.ScoreColumnsResponse:
    """The ScoreColumnsResponse of ``scores`` with every repeated field given as a Python list."""
    top = top_flags(scores, flags)
    statistics = scores.statistics.astype(np.float64)
    with_features = {} if scores.features is None else {
        "feature_mahalanobis": statistics[:, 3].tolist(), "feature_residual": statistics[:, 4].tolist()}
    return explain_pb2.ScoreColumnsResponse(
        **with_features,
        store_sha256=scores.scorer.store.sha256, target_fpr=scores.scorer.target_fpr,
        anomalous=scores.anomalous.tolist(), p_value=scores.p_value.tolist(), score=scores.score.tolist(),
        beta=scores.beta.tolist(), beta_percentile=scores.beta_percentile.tolist(), beta_z=scores.beta_z.tolist(),
        surprise=statistics[:, 0].tolist(), missing=statistics[:, 1].tolist(),
        surprise_count=scores.surprise_count.tolist(), expectation_count=scores.expectation_count.tolist(),
        test_p_values=scores.p_values[:, :-1].ravel().tolist(), reasons=scores.tests.ravel().tolist(),
        tests=scores.test_names,
        class_calibration=scores.from_class.tolist(),
        pooled_distribution=scores.scorer.reference.pooled[scores.classes].tolist(), top_flags=flags,
        smallest_p_value=(1 / (scores.scorer.class_counts[scores.classes] * scores.from_class
                               + scores.scorer.store.calibration["fallback"]["count"] * ~scores.from_class + 1)).tolist(),
        surprising_filters=top.surprising_filters.ravel().tolist(),
        surprising_exceedance=top.surprising_exceedance.ravel().tolist(),
        missing_filters=top.missing_filters.ravel().tolist(), missing_exceedance=top.missing_exceedance.ravel().tolist(),
    )


@pytest.mark.parametrize("flags", [0, 1, 4, MAX_FLAGS])
def test_columns_with_packed_arrays_equal_the_lists(varied, flags):
    # the double, float and bool arrays go in as wire bytes; the message must be the same
    varied_scores, features = varied
    for rows in (slice(None), slice(5, 6)):
        scores = varied_scores.scorer.score(varied_scores.alpha[rows], varied_scores.classes[rows],
                                            features=None if features is None else features[rows])
        response, expected = columns_response(scores, flags), columns_built_from_lists(scores, flags)
        assert response == expected and response.SerializeToString() == expected.SerializeToString()
        tests = len(scores.test_names)
        assert len(response.reasons) == tests * len(scores) and len(response.missing_exceedance) == flags * len(scores)
        # the client reads the (N, T) columns by the tests the response names
        read = ColumnScores.from_response(response)
        assert read.tests == scores.test_names and read.reasons.shape == (len(scores), tests)
        np.testing.assert_array_equal(read.test_p_values, scores.p_values[:, :-1])
        np.testing.assert_array_equal(read.reasons, scores.tests)
        samples = [scores.sample(row, max_flags=0) for row in range(len(scores))]
        assert read.smallest_p_value.tolist() == [sample.smallest_p_value for sample in samples]
        for name in ("feature_mahalanobis", "feature_residual"):  # NaN for rows scored without features
            expected = [np.nan if getattr(s, name) is None else getattr(s, name) for s in samples]
            np.testing.assert_array_equal(getattr(read, name), expected)


def test_varint_encodes_protobuf_varints():
    assert [varint(v) for v in (0, 1, 127, 128, 300, 2 ** 21)] == [b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02",
                                                                  b"\x80\x80\x80\x01"]


def test_feature_columns_are_read_as_one_view_and_checked():
    alpha, features = np.ones((4, FILTERS), np.float32), np.arange(4 * FILTERS, dtype=np.float32).reshape(4, FILTERS)
    request = columns_request(alpha, [0, 1, 2, 0], model=MODEL, features=features)
    parsed_alpha, classes, flags, parsed = parse_columns(request, FILTERS)
    np.testing.assert_array_equal(parsed, features)
    assert parsed.dtype == np.float32 and not parsed.flags.writeable and parse_columns(columns_request(
        alpha, [0, 1, 2, 0], model=MODEL), FILTERS)[3] is None  # no features: the alpha tests alone

    def refused(**changes) -> str:
        bad = explain_pb2.ScoreColumnsRequest()
        bad.CopyFrom(request)
        for name, value in changes.items():
            if name == "shape":
                bad.features.shape[:] = value
            else:
                setattr(bad.features, name, value)
        with pytest.raises(ValueError) as error:
            parse_columns(bad, FILTERS)
        return str(error.value)

    assert refused(dtype=explain_pb2.Tensor.FLOAT16) == "features.dtype: must be FLOAT32, got FLOAT16"
    assert refused(shape=[3, FILTERS]).startswith(f"features.shape: must be (N, {FILTERS}) with N = 4, one row per "
                                                  f"alpha row (one row of {FILTERS} values per input), got [3, {FILTERS}]")
    assert refused(shape=[4 * FILTERS]).startswith("features.shape:")
    assert refused(shape=[8, FILTERS // 2]).startswith("features.shape:")
    assert refused(data=bytes(4 * FILTERS * 4 - 4)) == (f"features.data: 4 x {FILTERS} float32 values are "
                                                        f"{4 * FILTERS * 4} bytes, got {4 * FILTERS * 4 - 4}")
    rows = MAX_COLUMN_VALUES // FILTERS + 1
    with pytest.raises(InputTooLarge, match=f"^alpha: at most {MAX_COLUMN_VALUES} values"):
        parse_columns(explain_pb2.ScoreColumnsRequest(alpha=explain_pb2.Tensor(
            shape=[rows, FILTERS], dtype=explain_pb2.Tensor.FLOAT32), classes=[0] * rows), FILTERS)


@pytest.fixture(scope="module")
def feature_stores(tmp_path_factory):
    """``--store-dir`` with MODEL's store (3 classes, FILTERS filters) calibrated with pooled features."""
    synthetic = SyntheticClasses.random(3, FILTERS)
    meta = dataclasses.replace(synthetic.meta, model_name=MODEL, model_version="1.0")
    stores = tmp_path_factory.mktemp("feature_stores")
    folder = build_store(synthetic.batches(200, batch_size=100), stores / MODEL, meta, top_k=2,
                         build_time="2026-01-01T00:00:00Z")
    classes = np.tile(np.arange(3), 100)
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(classes, seed=99), classes,
                                                   features=pooled_features(classes, 98, FILTERS), target_fpr=0.05,
                                                   min_class_count=1))  # 50 part-B images a class reach p < 0.05
    return stores, synthetic


def assert_close_messages(got, expected, path: str = "") -> None:
    """``got`` equals ``expected`` (messages as dicts) field for field, floats to 1e-5 relative: rows
    scored in another batch differ in the last bits of the feature tests' float32 matrix products
    (BLAS picks its kernels by the row count: d² 1.6e-6 apart relatively on an AMD EPYC)."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), path
        for key in expected:
            assert_close_messages(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for index, (left, right) in enumerate(zip(got, expected)):
            assert_close_messages(left, right, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-12), path
    else:
        assert got == expected, path


def test_score_requests_take_features_where_given(feature_stores):
    stores, synthetic = feature_stores
    scoring = AnomalyScoring(GatewayMetrics(), stores)
    scoring.load()
    scorer = scoring.scorer_for(MODEL)
    assert scorer.has_feature_tests
    classes = np.array([0, 1, 2, 1, 0, 2])
    alpha, features = synthetic.sample(classes, seed=7), pooled_features(classes, 7, FILTERS, far_every=3)
    # with and without features, and a label row that takes the same features
    requests = [score_request(alpha[i], model=MODEL, predicted_class=int(classes[i]),
                              features=features[i] if i % 2 == 0 else None) for i in range(5)]
    requests.append(score_request(alpha[5], model=MODEL, predicted_class=2, label=0, label_alpha=alpha[4],
                                  features=features[5]))
    reports = scoring.score_requests(requests, batch=True)
    for i, report in enumerate(reports):
        given = None if i % 2 and i != 5 else features[i:i + 1]
        expected = scorer.score(alpha[i:i + 1], classes[i:i + 1], features=given)
        assert expected.test_names == (TESTS + FEATURE_TESTS if given is not None else TESTS)
        assert_close_messages(MessageToDict(report.predicted), MessageToDict(class_verdict(expected, 0)), str(i))
    label = scorer.score(alpha[4:5], [0], features=features[5:6])
    assert_close_messages(MessageToDict(reports[5].label), MessageToDict(class_verdict(label, 0)))
    named = {reason.code for report in reports for reason in report.predicted.reasons}
    assert named & set(FEATURE_TESTS), named  # the far rows were flagged by a feature test

    wrong = requests[:2] + [score_request(alpha[2], model=MODEL, predicted_class=2, features=features[2][:-1])]
    with pytest.raises(ValueError, match=rf"^requests\[2\]\.features: features must be \(1, {FILTERS}\)"):
        scoring.score_requests(wrong, batch=True)
    nan = features[0].copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match=r"^features: features must be finite"):
        scoring.score_requests([score_request(alpha[0], model=MODEL, predicted_class=0, features=nan)], batch=False)


def test_explain_verdicts_take_the_handlers_features_and_count_every_test(feature_stores):
    stores, synthetic = feature_stores
    metrics = GatewayMetrics()
    scoring = AnomalyScoring(metrics, stores)
    scoring.load()
    scorer = scoring.scorer_for(MODEL)

    def fired(test: str) -> float:
        return metrics.registry.get_sample_value("explainserve_anomaly_test_fired_total", {"model": MODEL, "test": test})

    assert [fired(test) for test in TESTS + FEATURE_TESTS] == [0.0] * 5  # every series exists from the start
    classes = np.array([0, 1, 2] * 4)
    alpha, features = synthetic.sample(classes, seed=8), pooled_features(classes, 8, FILTERS, far_every=3)
    counted = dict.fromkeys(TESTS + FEATURE_TESTS, 0)
    for i, class_id in enumerate(classes):
        report = scoring.score(MODEL, alpha[i], int(class_id), label=(int(class_id) + 1) % 3, label_alpha=alpha[i - 1],
                               features=features[i])
        expected = scorer.score(np.stack([alpha[i], alpha[i - 1]]), [class_id, (class_id + 1) % 3],
                                features=np.stack([features[i]] * 2))
        assert report.predicted == class_verdict(expected, 0) and report.label == class_verdict(expected, 1)
        for test, below in zip(expected.test_names, expected.p_values[0, :-1] < scorer.target_fpr):
            counted[test] += int(below)
    assert counted["feature_mahalanobis"] + counted["feature_residual"] > 0
    assert {test: fired(test) for test in counted} == counted
    # without features (an older handler): the alpha tests alone
    plain = scoring.score(MODEL, alpha[0], 0)
    assert plain.predicted == class_verdict(scorer.score(alpha[:1], [0]), 0)
    # a handler's wrong features are never an error of the request
    wrong = scoring.score(MODEL, alpha[0], 0, features=features[0][:5])
    assert wrong.status == explain_pb2.AnomalyReport.UNAVAILABLE and wrong.reason.startswith("scoring failed: features")


def test_score_columns_with_features(feature_stores):
    stores, synthetic = feature_stores
    scoring = AnomalyScoring(GatewayMetrics(), stores)
    scoring.load()
    scorer = scoring.scorer_for(MODEL)
    classes = np.array([0, 1, 2, 1, 0, 2, 2])
    alpha, features = synthetic.sample(classes, seed=9), pooled_features(classes, 9, FILTERS, far_every=3)
    answer = score_columns(scorer, columns_request(alpha, classes, model=MODEL, features=features, top_flags=2))
    assert answer == columns_response(scorer.score(alpha, classes, features=features), 2)
    assert tuple(answer.tests) == TESTS + FEATURE_TESTS and len(answer.test_p_values) == 5 * len(classes)
    plain = score_columns(scorer, columns_request(alpha, classes, model=MODEL))
    assert tuple(plain.tests) == TESTS and plain == columns_response(scorer.score(alpha, classes), 1)
    nan = features.copy()
    nan[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"^features: features must be finite"):
        score_columns(scorer, columns_request(alpha, classes, model=MODEL, features=nan))
    # a response from a gateway that names no tests is read as the three alpha tests
    old = explain_pb2.ScoreColumnsResponse()
    old.CopyFrom(plain)
    old.ClearField("tests")
    old.ClearField("smallest_p_value")
    read = ColumnScores.from_response(old)
    assert read.tests == TESTS and read.reasons.shape == (len(classes), 3)
    assert np.isnan(read.smallest_p_value).all() and read.smallest_p_value.shape == (len(classes),)
    with pytest.raises(ValueError, match="scored with different tests"):
        ColumnScores.concatenate([read, ColumnScores.from_response(score_columns(scorer, columns_request(
            alpha, classes, model=MODEL, features=features)))])
