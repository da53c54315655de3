"""Bulk scoring over real gRPC: ScoreColumns and ScoreStream on gateways with a calibrated
synthetic store (no TorchServe: scoring needs none for a model with a store).

Every columnar answer is compared with the per-message ScoreBatch answer for the same vectors;
bad shapes, sizes and classes are refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED; a stream
is authenticated per message and holds one admission turn.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from explainserve._generated import explain_pb2, explain_pb2_grpc
from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.conformal import TESTS
from explainserve.anomaly.feature_tests import FEATURE_TESTS
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.client import ColumnScores, ExplainClient, ExplainError, columns_request, score_request
from explainserve.sidecar.auth import key_sha256, new_key
from explainserve.sidecar.columns import MAX_COLUMN_VALUES
from explainserve.sidecar.local import start_gateway, stop_gateway, wait_serving
from explainserve.sidecar.torchserve import free_port
from support.pooled_features import pooled_features

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MODEL = "synthetic"  # SyntheticClasses' model name
FEATURE_MODEL = "synthetic_features"  # the same classes, calibrated with pooled features too
CLASSES, FILTERS = 12, 96
SYNTHETIC = SyntheticClasses.random(CLASSES, FILTERS, seed=3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """``--store-dir`` with two calibrated synthetic stores of 40 training vectors per class: MODEL's
    from 30 held-out vectors per class, FEATURE_MODEL's from 50 with their pooled features."""
    stores = tmp_path_factory.mktemp("column_stores")
    for model, per_class in ((MODEL, 30), (FEATURE_MODEL, 50)):
        build_store(SYNTHETIC.batches(40, batch_size=240), stores / model,
                    dataclasses.replace(SYNTHETIC.meta, model_name=model), build_time="2026-01-01T00:00:00Z")
        store = load_store(stores / model)
        held_out = np.repeat(np.arange(CLASSES), per_class)
        features = pooled_features(held_out, 12, FILTERS) if model == FEATURE_MODEL else None
        save_calibration(store, calibrate(store, SYNTHETIC.sample(held_out, seed=11), held_out, features=features,
                                          target_fpr=0.05))
    return stores


def gateway(workdir: Path, stores: Path, *flags: str):
    """A gateway process with ``stores``, yielded as its target; always stopped."""
    nowhere = f"127.0.0.1:{free_port()}"
    process, target, _ = start_gateway(workdir, nowhere, nowhere, poll_interval=30.0,
                                       extra_args=("--store-dir", str(stores), *flags))
    try:
        wait_serving(target, timeout=120, process=process, service="anomaly")
        yield target
    finally:
        stop_gateway(process)
        if process.returncode not in (0, -15):
            print((workdir / "gateway.log").read_text(errors="replace")[-4000:])


@pytest.fixture(scope="module")
def target(stores, tmp_path_factory):
    yield from gateway(tmp_path_factory.mktemp("columns_gateway"), stores)


@pytest.fixture(scope="module")
def client(target):
    with ExplainClient(target) as client:
        yield client


def mixed_vectors(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` alpha vectors and their classes: in-distribution ones, shifted ones (a few
    flags) and far ones (every filter flagged), so verdicts, flag counts and padding all vary."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, CLASSES, size=count)
    alpha = SYNTHETIC.sample(classes, seed=seed)
    shift = rng.choice([0.0, 2.5, -2.5, 20.0], size=count)[:, None] * SYNTHETIC.scale[classes]
    shift[:, ::2] *= rng.random((count, 1)) < 0.5  # some rows shifted on half the filters only
    return (alpha + shift).astype(np.float32), classes


def assert_rows_equal_the_verdicts(scores: ColumnScores, reports: list, flags: int) -> None:
    """Row i of ``scores`` holds exactly ``reports[i].predicted`` (its first ``flags`` flags)."""
    assert len(scores.p_value) == len(reports)
    for i, report in enumerate(reports):
        verdict = report.predicted
        assert scores.store_sha256 == report.store_sha256 and scores.target_fpr == verdict.target_fpr
        assert scores.anomalous[i] == (verdict.verdict == explain_pb2.ClassVerdict.ANOMALOUS)
        assert scores.pooled_distribution[i] == verdict.pooled_distribution
        for name in ("p_value", "score", "beta", "beta_percentile", "beta_z", "surprise", "missing",
                     "surprise_count", "expectation_count", "smallest_p_value"):
            assert getattr(scores, name)[i] == getattr(verdict, name), (i, name)
        for name in ("feature_mahalanobis", "feature_residual"):  # NaN: scored without the feature tests
            served = getattr(verdict, name) if verdict.HasField(name) else np.nan
            np.testing.assert_array_equal(getattr(scores, name)[i], served)
        assert {scores.tests[t] for t in np.flatnonzero(scores.reasons[i])} == {r.code for r in verdict.reasons}
        for reason in verdict.reasons:
            assert scores.test_p_values[i, scores.tests.index(reason.code)] == reason.p_value
            assert scores.class_calibration[i] == (reason.source != "fallback")
        for filters, exceedance, served in (
                (scores.surprising_filters, scores.surprising_exceedance, verdict.surprising_filters),
                (scores.missing_filters, scores.missing_exceedance, verdict.missing_filters)):
            expected = [(f.filter, f.exceedance) for f in served[:flags]]
            expected += [(-1, 0.0)] * (flags - len(expected))
            assert list(zip(filters[i].tolist(), exceedance[i].tolist())) == expected, i


def test_columns_and_streams_equal_score_batch(client, stores):
    alpha, classes = mixed_vectors(60, seed=1)
    reports = client.score_batch([score_request(row, model=MODEL, predicted_class=int(c)) for row, c in zip(alpha, classes)],
                                 timeout=30)
    flags = 3
    columns = client.score_columns(alpha, classes, model=MODEL, top_flags=flags, timeout=30)
    assert_rows_equal_the_verdicts(columns, reports, flags)
    # the vectors exercise both verdicts, rows with more flags than returned and rows padded
    assert set(columns.anomalous.tolist()) == {False, True}
    assert (columns.surprise_count > flags).any() and (columns.surprise_count < flags).any()
    assert columns.reasons[columns.anomalous].any(axis=1).all()
    library = Scorer(load_store(stores / MODEL)).score(alpha, classes)  # what a ClassVerdict leaves out
    assert np.array_equal(columns.test_p_values, library.p_values[:, :-1])
    assert np.array_equal(columns.class_calibration, library.from_class)

    streamed = client.score_all(alpha, classes, model=MODEL, top_flags=flags, rows_per_message=7, timeout=30)
    for name in ColumnScores.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(streamed, name), getattr(columns, name), err_msg=name)

    default = client.score_columns(alpha[:5], classes[:5], model=MODEL, timeout=30)
    assert default.top_flags == 1 and default.surprising_filters.shape == (5, 1)
    assert np.array_equal(default.surprising_filters[:, 0], columns.surprising_filters[:5, 0])
    none = client.score_columns(alpha[:5], classes[:5], model=MODEL, top_flags=0, timeout=30)
    assert none.surprising_filters.shape == (5, 0) and np.array_equal(none.p_value, columns.p_value[:5])


def test_features_reach_columns_streams_and_score_batch(client, stores):
    """With the inputs' pooled features, a store calibrated with them answers the five-test
    verdict on every path, as the library does; without them, the alpha tests' one."""
    alpha, classes = mixed_vectors(40, seed=6)
    features = pooled_features(classes, 6, FILTERS, far_every=3)
    library = Scorer(load_store(stores / FEATURE_MODEL)).score(alpha, classes, features=features)
    assert library.test_names == TESTS + FEATURE_TESTS and library.tests[:, len(TESTS):].any(axis=0).all()
    flags = 2
    columns = client.score_columns(alpha, classes, model=FEATURE_MODEL, features=features, top_flags=flags, timeout=30)
    assert columns.tests == library.test_names and columns.test_p_values.shape == columns.reasons.shape == (40, 5)
    assert np.array_equal(columns.test_p_values, library.p_values[:, :-1]) and np.array_equal(columns.reasons, library.tests)
    assert np.array_equal(columns.p_value, library.p_value) and np.array_equal(columns.anomalous, library.anomalous)
    assert np.array_equal(np.column_stack([columns.feature_mahalanobis, columns.feature_residual]),
                          library.statistics[:, len(TESTS):-1])
    reports = client.score_batch([score_request(row, model=FEATURE_MODEL, predicted_class=int(c), features=f)
                                  for row, c, f in zip(alpha, classes, features)], timeout=30)
    assert_rows_equal_the_verdicts(columns, reports, flags)
    for i, report in enumerate(reports):  # a feature test's reason names its features, as the library ranks them
        for reason in report.predicted.reasons:
            if reason.code in FEATURE_TESTS:
                top, shares = library.feature_columns(i, reason.code)
                assert [(f.feature, f.share) for f in reason.features] == list(zip(top, shares))
    streamed = client.score_all(alpha, classes, model=FEATURE_MODEL, features=features, top_flags=flags,
                                rows_per_message=7, timeout=30)
    assert streamed.tests == columns.tests and np.array_equal(streamed.anomalous, columns.anomalous)
    # rows scored in other batches: BLAS picks its float32 kernels by the batch's row count, so the
    # feature tests' products may differ in the last bits (p-values 3.7e-6 apart relatively on an AMD EPYC)
    np.testing.assert_allclose(streamed.test_p_values, columns.test_p_values, rtol=1e-5)
    plain = client.score_columns(alpha, classes, model=FEATURE_MODEL, timeout=30)  # no features: three tests
    assert plain.tests == TESTS and np.isnan(plain.feature_residual).all() and np.array_equal(plain.p_value, Scorer(load_store(stores / FEATURE_MODEL)).score(
        alpha, classes).p_value)


def raw_request(**changes) -> explain_pb2.ScoreColumnsRequest:
    """A valid request of four rows with ``changes`` applied (``alpha_*`` and ``features_*`` fields
    to those tensors)."""
    alpha, classes = mixed_vectors(4, seed=2)
    request = columns_request(alpha, classes, model=MODEL)
    for name, value in changes.items():
        tensor, _, field = name.partition("_")
        target, field = (getattr(request, tensor), field) if tensor in ("alpha", "features") else (request, name)
        target.ClearField(field)
        if isinstance(value, (list, tuple)):
            getattr(target, field).extend(value)
        else:
            setattr(target, field, value)
    return request


BAD_COLUMNS = {  # case -> (changes, status, start of the message, text in it)
    "float16": ({"alpha_dtype": explain_pb2.Tensor.FLOAT16}, "INVALID_ARGUMENT", "alpha.dtype:", "FLOAT32"),
    "one axis": ({"alpha_shape": [4 * FILTERS]}, "INVALID_ARGUMENT", "alpha.shape:", f"(N, {FILTERS})"),
    "wrong filters": ({"alpha_shape": [8, FILTERS // 2]}, "INVALID_ARGUMENT", "alpha.shape:", f"(N, {FILTERS})"),
    "no rows": ({"alpha_shape": [0, FILTERS], "alpha_data": b"", "classes": []}, "INVALID_ARGUMENT",
                "alpha.shape:", "N >= 1"),
    "short data": ({"alpha_data": bytes(4 * FILTERS * 4 - 4)}, "INVALID_ARGUMENT", "alpha.data:", "bytes"),
    "fewer classes": ({"classes": [0, 1, 2]}, "INVALID_ARGUMENT", "classes:", "(4), got 3"),
    "unknown class": ({"classes": [0, 1, CLASSES, 2]}, "INVALID_ARGUMENT", "classes:", f"unknown class {CLASSES}"),
    "NaN": ({"alpha_data": np.full((4, FILTERS), np.nan, "<f4").tobytes()}, "INVALID_ARGUMENT", "alpha:", "NaN"),
    "top flags": ({"top_flags": 33}, "INVALID_ARGUMENT", "top_flags:", "[0, 32]"),
    "no model": ({"model": ""}, "INVALID_ARGUMENT", "model:", "names no model"),
    "float16 features": ({"features_dtype": explain_pb2.Tensor.FLOAT16, "features_shape": [4, FILTERS],
                          "features_data": bytes(4 * FILTERS * 2)}, "INVALID_ARGUMENT", "features.dtype:", "FLOAT32"),
    "fewer feature rows": ({"features_dtype": explain_pb2.Tensor.FLOAT32, "features_shape": [3, FILTERS],
                            "features_data": bytes(3 * FILTERS * 4)}, "INVALID_ARGUMENT", "features.shape:",
                           f"(N, {FILTERS}) with N = 4"),
    "short features": ({"features_dtype": explain_pb2.Tensor.FLOAT32, "features_shape": [4, FILTERS],
                        "features_data": bytes(4 * FILTERS * 4 - 4)}, "INVALID_ARGUMENT", "features.data:", "bytes"),
    "NaN features": ({"model": FEATURE_MODEL, "features_dtype": explain_pb2.Tensor.FLOAT32,
                      "features_shape": [4, FILTERS], "features_data": np.full((4, FILTERS), np.nan, "<f4").tobytes()},
                     "INVALID_ARGUMENT", "features:", "finite"),
    "too many values": ({"alpha_shape": [MAX_COLUMN_VALUES // FILTERS + 1, FILTERS],
                         "alpha_data": bytes((MAX_COLUMN_VALUES // FILTERS + 1) * FILTERS * 4),
                         "classes": [0] * (MAX_COLUMN_VALUES // FILTERS + 1)},
                        "RESOURCE_EXHAUSTED", "alpha:", f"at most {MAX_COLUMN_VALUES} values"),
}


@pytest.mark.parametrize("case", sorted(BAD_COLUMNS))
def test_bad_columns_are_refused_naming_the_field(client, case):
    changes, status, field, text = BAD_COLUMNS[case]
    with pytest.raises(ExplainError) as refused:
        client._call(client.stub.ScoreColumns, raw_request(**changes), 60)
    assert refused.value.code == getattr(grpc.StatusCode, status)
    assert refused.value.details.startswith(field) and text in refused.value.details, refused.value.details
    alpha, classes = mixed_vectors(3, seed=4)
    assert len(client.score_columns(alpha, classes, model=MODEL, timeout=10).p_value) == 3


def test_a_stream_answers_up_to_the_bad_message_and_names_it(client):
    good = raw_request()
    bad = raw_request(classes=[0, 1])
    answers = []
    with pytest.raises(grpc.RpcError) as refused:
        for answer in client.stub.ScoreStream(iter([good, good, bad, good]), timeout=30):
            answers.append(answer)
    assert len(answers) == 2
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("messages[2].classes:"), refused.value.details()


class HeldStream:
    """A ScoreStream whose request iterator waits after its first message until released."""

    def __init__(self, stub, request, metadata=None):
        self.release = threading.Event()
        self.responses = stub.ScoreStream(self._requests(request), timeout=60, metadata=metadata)

    def _requests(self, request):
        yield request
        self.release.wait(30)


def test_a_stream_is_authenticated_per_message_and_holds_one_turn(stores, tmp_path):
    keys_file = tmp_path / "keys.json"
    allowed, limited = new_key(), new_key()
    keys_file.write_text(json.dumps({"keys": [{"name": "jobs", "sha256": key_sha256(allowed)},
                                              {"name": "other", "sha256": key_sha256(limited), "models": ["other"]}]}))
    for target in gateway(tmp_path, stores, "--auth-keys", str(keys_file), "--max-concurrent-requests", "1",
                          "--max-queued-requests", "0"):
        with grpc.insecure_channel(target) as channel:
            stub = explain_pb2_grpc.ExplainerStub(channel)
            request = raw_request()
            for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", f"Bearer {limited}"),), grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.ScoreStream(iter([request]), timeout=30, metadata=metadata))
                assert refused.value.code() == code, refused.value.details()

            key = (("authorization", f"Bearer {allowed}"),)
            held = HeldStream(stub, request, key)
            assert len(next(held.responses).p_value) == 4  # the stream is at work, holding the only turn
            with pytest.raises(grpc.RpcError) as shed:
                stub.ScoreColumns(request, timeout=10, metadata=key)
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.release.set()
            assert list(held.responses) == []
            assert len(stub.ScoreColumns(request, timeout=10, metadata=key).p_value) == 4  # the turn is back
