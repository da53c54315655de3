"""The gateway's store folder (AnomalyScoring) without any process: which folders are stores,
which model and version each may score, and the health it reports."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from explainserve._generated import explain_pb2
from explainserve.anomaly import ANOMALOUS, Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.scorer import MAX_FLAGS
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.sidecar.metrics import GatewayMetrics
from explainserve.anomaly.top_flags import top_flags
from explainserve.sidecar.columns import columns_response, varint
from explainserve.sidecar.scoring import AnomalyScoring, class_verdict

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


def verdict_built_message_by_message(scores, row: int) -> explain_pb2.ClassVerdict:
    """Row ``row`` of ``scores`` as a ClassVerdict built from ``sample()`` with one message per
    flag, reason and verdict: the straightforward construction the served one must equal."""
    sample = scores.sample(row, max_flags=MAX_FLAGS)
    verdict = explain_pb2.ClassVerdict

    def flags(found) -> list:
        return [explain_pb2.FilterFlag(filter=f.filter, alpha=f.alpha, threshold=f.threshold, exemplars=f.exemplars,
                                       exceedance=f.exceedance) for f in found]

    return verdict(
        class_index=sample.class_id, class_name=sample.class_name,
        verdict=verdict.ANOMALOUS if sample.verdict == ANOMALOUS else verdict.NORMAL,
        beta=sample.beta, beta_percentile=sample.beta_percentile, beta_z=sample.beta_z, score=sample.score,
        p_value=sample.p_value, target_fpr=scores.scorer.target_fpr, surprise=sample.surprise, missing=sample.missing,
        reasons=[explain_pb2.VerdictReason(code=r.code, value=r.value, threshold=r.threshold, source=r.source,
                                           p_value=r.p_value) for r in sample.reasons],
        surprise_count=int(scores.surprise_count[row]), expectation_count=int(scores.expectation_count[row]),
        surprising_filters=flags(sample.surprising), missing_filters=flags(sample.expected_missing),
        pooled_distribution=bool(scores.scorer.reference.pooled[sample.class_id]),
    )


@pytest.fixture(scope="module")
def varied_scores(tmp_path_factory):
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
    held_out = np.repeat(np.arange(classes_count), 30)
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(held_out, seed=5), held_out,
                                                   target_fpr=0.05, min_class_count=1))
    scorer = Scorer(load_store(folder))
    rng = np.random.default_rng(0)
    classes = np.tile(np.arange(classes_count), 12)
    alpha = synthetic.sample(classes, seed=1) * rng.choice([1.0, 1.5, 4.0, -2.0], size=(len(classes), 1))
    alpha[0] = scorer.reference.p_high[0] + 1.0  # every filter surprising
    scores = scorer.score(alpha.astype(np.float32), classes)
    assert scores.surprise_count.max() == filters > MAX_FLAGS and scores.anomalous.any() and not scores.anomalous.all()
    assert scorer.reference.pooled[2] and scorer.reference.counts[1] == 2
    return scores


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
    unflagged = scores.sample(0, max_flags=0)  # what class_verdict reads besides the flag columns
    assert unflagged.surprising == unflagged.expected_missing == () and unflagged.p_value == scores.sample(0).p_value
    with pytest.raises(ValueError, match="kind must be 'surprising' or 'expected_missing', got 'surprise'"):
        scores.flag_columns(0, "surprise")


def columns_built_from_lists(scores, flags: int) -> explain_pb2.ScoreColumnsResponse:
    """The ScoreColumnsResponse of ``scores`` with every repeated field given as a Python list."""
    top = top_flags(scores, flags)
    statistics = scores.statistics.astype(np.float64)
    return explain_pb2.ScoreColumnsResponse(
        store_sha256=scores.scorer.store.sha256, target_fpr=scores.scorer.target_fpr,
        anomalous=scores.anomalous.tolist(), p_value=scores.p_value.tolist(), score=scores.score.tolist(),
        beta=scores.beta.tolist(), beta_percentile=scores.beta_percentile.tolist(), beta_z=scores.beta_z.tolist(),
        surprise=statistics[:, 0].tolist(), missing=statistics[:, 1].tolist(),
        surprise_count=scores.surprise_count.tolist(), expectation_count=scores.expectation_count.tolist(),
        test_p_values=scores.p_values[:, :-1].ravel().tolist(), reasons=scores.tests.ravel().tolist(),
        class_calibration=scores.from_class.tolist(),
        pooled_distribution=scores.scorer.reference.pooled[scores.classes].tolist(), top_flags=flags,
        surprising_filters=top.surprising_filters.ravel().tolist(),
        surprising_exceedance=top.surprising_exceedance.ravel().tolist(),
        missing_filters=top.missing_filters.ravel().tolist(), missing_exceedance=top.missing_exceedance.ravel().tolist(),
    )


@pytest.mark.parametrize("flags", [0, 1, 4, MAX_FLAGS])
def test_columns_with_packed_arrays_equal_the_lists(varied_scores, flags):
    # the double, float and bool arrays go in as wire bytes; the message must be the same
    for rows in (slice(None), slice(5, 6)):
        scores = varied_scores.scorer.score(varied_scores.alpha[rows], varied_scores.classes[rows])
        response, expected = columns_response(scores, flags), columns_built_from_lists(scores, flags)
        assert response == expected and response.SerializeToString() == expected.SerializeToString()
        assert len(response.reasons) == 3 * len(scores) and len(response.missing_exceedance) == flags * len(scores)


def test_varint_encodes_protobuf_varints():
    assert [varint(v) for v in (0, 1, 127, 128, 300, 2 ** 21)] == [b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02",
                                                                  b"\x80\x80\x80\x01"]
