"""Anomaly scoring in the gateway sidecar: a real TorchServe serving the demo image model, a
sidecar with a small calibrated store (--store-dir), and sidecars with broken stores.

Every verdict is compared with the anomaly library applied to the handler's own alpha.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explainserve._generated import explain_pb2, explain_pb2_grpc, handler_pb2, inference_pb2, inference_pb2_grpc
from explainserve.anomaly import ANOMALOUS, Scorer, load_store
from explainserve.anomaly.conformal import TESTS
from explainserve.anomaly.feature_tests import FEATURE_TESTS
from explainserve.client import ExplainClient, ExplainError, build_request, score_request
from explainserve.commands.archive import demo_model
from explainserve.commands.serve import unpack_stores
from explainserve.data.scenes import FashionScenes
from explainserve.sidecar.local import wait_serving
from explainserve.sidecar.scoring import MAX_BATCH, MAX_FLAGS, AnomalyScoring
from explainserve.sidecar.metrics import GatewayMetrics
from explainserve.sidecar.torchserve import free_port
from explainserve.wire import MAX_MESSAGE_BYTES
from explainserve.wire import HANDLER_REQUEST_KEY
from support.serving_harness import build_demo_store, png, start_gateway, stack_for_module, stop_gateway, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MODEL = "demo_image"
SIDE = 64


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """A calibrated store of the demo image model from 160 training and 80 validation scenes
    (every class ranked in the class-independent group), built once."""
    return build_demo_store("image", tmp_path_factory.mktemp("anomaly_store") / MODEL, 160, 80)


@pytest.fixture(scope="module")
def scorer(demo_store) -> Scorer:
    return Scorer(load_store(demo_store, model_name=MODEL, model_version="1.0"))


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, demo_store):
    workdir = tmp_path_factory.mktemp("sidecar_anomaly")
    stores = workdir / "stores"
    shutil.copytree(demo_store, stores / MODEL)
    (stores / ".shards" / "0").mkdir(parents=True)  # a sharded build's leftovers are skipped
    yield from stack_for_module(request, workdir, [demo_model("image")], batch_size=4, max_batch_delay_ms=20,
                                gateway_args=("--store-dir", str(stores)))


@pytest.fixture(scope="module")
def client(stack):
    with ExplainClient(stack.target) as client:
        yield client


def scenes(split: str, count: int) -> list[dict]:
    data = FashionScenes(split, seed=5, size=count, image_size=SIDE)
    return [data[i] for i in range(count)]


def handler_answer(stack, request: explain_pb2.ExplainRequest) -> handler_pb2.HandlerResponse:
    """What the handler answers the gateway for ``request`` (alpha and label_alpha included)."""
    with grpc.insecure_channel(stack.torchserve.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        answer = stub.Predictions(inference_pb2.PredictionsRequest(
            model_name=request.model, input={HANDLER_REQUEST_KEY: request.SerializeToString()}), timeout=120)
    return handler_pb2.HandlerResponse.FromString(answer.prediction)


def assert_verdict_is(verdict: explain_pb2.ClassVerdict, scores, row: int = 0) -> None:
    """The served ClassVerdict carries exactly the library's result for ``scores`` row ``row``
    (its flag lists cut to the MAX_FLAGS most extreme)."""
    sample = scores.sample(row)
    assert (verdict.surprise_count, verdict.expectation_count) == (len(sample.surprising), len(sample.expected_missing))
    assert (verdict.class_index, verdict.class_name) == (sample.class_id, sample.class_name)
    expected = explain_pb2.ClassVerdict.ANOMALOUS if sample.verdict == ANOMALOUS else explain_pb2.ClassVerdict.NORMAL
    assert verdict.verdict == expected
    assert (verdict.beta, verdict.beta_percentile, verdict.beta_z, verdict.score, verdict.p_value) == (
        sample.beta, sample.beta_percentile, sample.beta_z, sample.score, sample.p_value)
    assert (verdict.surprise, verdict.missing, verdict.target_fpr) == (sample.surprise, sample.missing,
                                                                       scores.scorer.target_fpr)
    assert (verdict.verdict == explain_pb2.ClassVerdict.ANOMALOUS) == (verdict.p_value < verdict.target_fpr)
    for name in ("feature_mahalanobis", "feature_residual"):  # set exactly when scored with the feature tests
        assert (getattr(verdict, name) if verdict.HasField(name) else None) == getattr(sample, name)
    assert [(r.code, r.value, r.threshold, r.source, r.p_value, [(f.feature, f.share) for f in r.features])
            for r in verdict.reasons] == [(*r[:5], [tuple(f) for f in r.features]) for r in sample.reasons]
    for served, flags in ((verdict.surprising_filters, sample.surprising), (verdict.missing_filters, sample.expected_missing)):
        assert [(f.filter, f.alpha, f.threshold, tuple(f.exemplars), f.exceedance) for f in served] == [
            (f.filter, np.float32(f.alpha), np.float32(f.threshold), f.exemplars, np.float32(f.exceedance))
            for f in flags[:MAX_FLAGS]]


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def metrics_text(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(match.group(2))
    return total


# -- Explain -------------------------------------------------------------------------------
def test_explain_verdicts_equal_the_library_on_the_handlers_alpha(stack, client, scorer):
    """In-distribution scenes with their labels, and uniform noise (ANOMALOUS by every test).

    The handler returns the pooled features beside alpha and the gateway scores both: with a
    store calibrated with features (``scorer.has_feature_tests``) the verdict is the five-test one,
    with an alpha-only store the three-test one; either way it is the library's on the same rows."""
    samples = scenes("test", 3)
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    cases = [(sample["image"], sample["label"]) for sample in samples] + [(noise, None)]
    tests = TESTS + FEATURE_TESTS if scorer.has_feature_tests else TESTS
    verdicts, alpha_only_p = [], []
    for image, label in cases:
        request = build_request(png(image), model=MODEL, label=label)
        result = client.send(request, timeout=60)
        handler = handler_answer(stack, request)  # the same alpha and features, computed again by the same handler
        anomaly = result.anomaly
        assert anomaly.status == explain_pb2.AnomalyReport.OK, anomaly.reason
        assert anomaly.store_sha256 == scorer.store.sha256
        assert len(result.classes) == 5 and result.predicted_class == result.target_class == anomaly.predicted.class_index
        assert len(handler.features) == len(handler.alpha) == scorer.store.meta.num_filters
        # the gateway's rows: alpha for the predicted class, then label_alpha for the label, the input's features on each
        rows, classes = [handler.alpha], [result.predicted_class]
        if label is not None:
            assert len(handler.label_alpha) == len(handler.alpha)
            rows.append(handler.label_alpha)
            classes.append(label)
        expected = scorer.score(np.asarray(rows, dtype=np.float32), classes,
                                features=np.tile(np.asarray(handler.features, dtype=np.float32), (len(rows), 1)))
        assert expected.test_names == tests
        assert_verdict_is(anomaly.predicted, expected, 0)
        if label is None:
            assert not anomaly.HasField("label")
        else:
            assert_verdict_is(anomaly.label, expected, 1)
        alpha_only = scorer.score(np.asarray(rows, dtype=np.float32), classes)
        if not scorer.has_feature_tests:  # the features are ignored: the alpha tests' verdict
            assert_verdict_is(anomaly.predicted, alpha_only, 0)
        alpha_only_p.append(alpha_only.p_value[0])
        verdicts.append(anomaly.predicted)
    if scorer.has_feature_tests:  # the five-test verdict is another one than the alpha tests'
        assert [verdict.p_value for verdict in verdicts] != alpha_only_p
    noisy = verdicts[-1]
    assert noisy.verdict == explain_pb2.ClassVerdict.ANOMALOUS and noisy.score > 0 and noisy.reasons
    assert noisy.surprising_filters and all(len(f.exemplars) > 0 for f in noisy.surprising_filters)
    assert {reason.source for reason in noisy.reasons} == {"fallback"}  # 80 validation scenes: no class has its own


def test_a_target_class_is_explained_and_scored_against_that_class(stack, client, scorer):
    """The predicted verdict is scored against the class explained: the request's target_class
    when it sets one (another label of a multi-label input), with alpha computed for it."""
    sample = scenes("test", 1)[0]
    predicted = client.send(build_request(png(sample["image"]), model=MODEL), timeout=60).predicted_class
    target = (predicted + 1) % scorer.store.num_classes
    request = build_request(png(sample["image"]), model=MODEL, target_class=target)
    result = client.send(request, timeout=60)
    handler = handler_answer(stack, request)
    assert (result.predicted_class, result.target_class, result.anomaly.predicted.class_index) == (predicted, target, target)
    expected = scorer.score(np.asarray([handler.alpha], dtype=np.float32), [target],
                            features=np.asarray([handler.features], dtype=np.float32))
    assert_verdict_is(result.anomaly.predicted, expected, 0)


def test_anomaly_health_is_serving_with_every_store_good(stack):
    assert health(stack.target, "anomaly") == health_pb2.HealthCheckResponse.SERVING
    assert health(stack.target, "") == health_pb2.HealthCheckResponse.SERVING


def test_anomaly_metrics_are_exported_and_promtool_clean(stack, client, scorer):
    before = metrics_text(stack.metrics_url)
    for sample in scenes("test", 2):
        client.explain(png(sample["image"]), model=MODEL, timeout=60)
    text = metrics_text(stack.metrics_url)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def increase(name, **labels):
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert increase("explainserve_anomaly_verdicts_total", model=MODEL) == 2
    assert increase("explainserve_anomaly_beta_count", model=MODEL) == 2
    assert increase("explainserve_anomaly_scoring_duration_seconds_count") == 2
    assert metric_value(text, "explainserve_anomaly_surprise_flags_total", model=MODEL) > 0
    assert 'explainserve_anomaly_expectation_flags_total{model="demo_image"}' in text
    assert 'explainserve_anomaly_beta_bucket{le="0.0",model="demo_image"}' in text
    assert metric_value(text, "explainserve_store_info", model=MODEL, version="1.0", sha256=scorer.store.sha256) == 1
    assert metric_value(text, "explainserve_store_build_timestamp_seconds", model=MODEL) == scorer.store.build_timestamp
    # 80 val images at 5 %: the fallback group ranks 40, and 1/41 is below the target
    assert metric_value(text, "explainserve_store_classes_never_anomalous", model=MODEL) == 0
    assert "explainserve_anomaly_unavailable_total{" not in text
    assert 'class="' not in text  # per-class labels are off by default
    # both verdict series exist from the start (the alert rules divide one by the other)
    assert 'explainserve_anomaly_verdicts_total{model="demo_image",verdict="anomalous"}' in before
    assert 'explainserve_anomaly_verdicts_total{model="demo_image",verdict="normal"}' in before


# -- Score / ScoreBatch --------------------------------------------------------------------
def alpha_near_mean(scorer: Scorer, class_id: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """An alpha vector around class ``class_id``'s training mean (multiplicative noise)."""
    mean = np.asarray(scorer.store.arrays["mean"][class_id], dtype=np.float32)
    return (mean * np.random.default_rng(seed).normal(1.0, spread, mean.shape)).astype(np.float32)


def test_score_and_score_batch_equal_the_library(client, scorer):
    classes = np.arange(10) % scorer.store.num_classes
    alphas = [alpha_near_mean(scorer, int(c), seed, spread=0.2 + 0.3 * (seed % 3)) for seed, c in enumerate(classes)]
    for alpha, class_id in zip(alphas[:3], classes):
        report = client.score(alpha, model=MODEL, predicted_class=int(class_id), timeout=10)
        assert report.status == explain_pb2.AnomalyReport.OK and report.store_sha256 == scorer.store.sha256
        assert_verdict_is(report.predicted, scorer.score(alpha, class_id))
        assert not report.HasField("label")

    labels = (classes + 1) % scorer.store.num_classes
    requests = [score_request(alpha, model=MODEL, predicted_class=int(c),
                              **({"label": int(label), "label_alpha": alpha[::-1].copy()} if i % 2 else {}))
                for i, (alpha, c, label) in enumerate(zip(alphas, classes, labels))]
    reports = client.score_batch(requests, timeout=30)
    expected = scorer.score(np.stack(alphas), classes)
    assert len(reports) == len(requests)
    for i, report in enumerate(reports):
        assert_verdict_is(report.predicted, expected, i)
        if i % 2:
            assert_verdict_is(report.label, scorer.score(alphas[i][::-1].copy(), labels[i]))
        else:
            assert not report.HasField("label")
    assert {r.predicted.verdict for r in reports} == {explain_pb2.ClassVerdict.NORMAL, explain_pb2.ClassVerdict.ANOMALOUS}

    everything = np.asarray(scorer.store.arrays["p_high"][4], dtype=np.float32) + 1  # every filter surprising
    report = client.score(everything, model=MODEL, predicted_class=4, timeout=10)
    assert report.predicted.surprise_count == everything.size and len(report.predicted.surprising_filters) == MAX_FLAGS
    assert_verdict_is(report.predicted, scorer.score(everything, 4))


def oversize_score(stack) -> None:
    """A ScoreRequest over the server's message limit, sent as raw bytes."""
    head = explain_pb2.ScoreRequest(model=MODEL, predicted_class=0).SerializeToString()
    floats = MAX_MESSAGE_BYTES // 4 + 1
    length = floats * 4
    varint = bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    body = head + bytes([3 << 3 | 2]) + bytes(varint) + bytes(floats * 4)  # field 3 (alpha), packed
    with grpc.insecure_channel(stack.target) as channel:
        channel.unary_unary("/explainserve.v1.Explainer/Score")(body, timeout=60)


BAD_SCORES = {
    "wrong length": (lambda s, a: {"alpha": a[:-1]}, "alpha", "128 filter scores"),
    "NaN": (lambda s, a: {"alpha": np.where(np.arange(a.size) == 7, np.nan, a)}, "alpha", "NaN"),
    "unknown class": (lambda s, a: {"predicted_class": 8}, "predicted_class", "unknown class 8"),
    "negative class": (lambda s, a: {"predicted_class": -1}, "predicted_class", "unknown class -1"),
    "unknown model": (lambda s, a: {"model": "no_such_model"}, "model", "unknown model 'no_such_model'"),
    "label without label_alpha": (lambda s, a: {"label": 1}, "label_alpha", "exactly when label is set"),
    "unknown label": (lambda s, a: {"label": 99, "label_alpha": a}, "label", "unknown class 99"),
    "no model": (lambda s, a: {"model": ""}, "model", "names no model"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_score_refuses_bad_input_naming_it_and_keeps_serving(client, scorer, case):
    change, field, problem = BAD_SCORES[case]
    alpha = alpha_near_mean(scorer, 2, seed=1)
    fields = {"alpha": alpha, "model": MODEL, "predicted_class": 2, **change(scorer, alpha)}
    with pytest.raises(ExplainError) as refused:
        client.score(fields.pop("alpha"), timeout=10, **fields)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details.startswith(f"{field}:") and problem in refused.value.details, refused.value.details
    assert client.score(alpha, model=MODEL, predicted_class=2, timeout=10).status == explain_pb2.AnomalyReport.OK


def test_score_batch_names_the_bad_request(client, scorer):
    good = [score_request(alpha_near_mean(scorer, c, seed=c), model=MODEL, predicted_class=c) for c in range(4)]
    bad = score_request(alpha_near_mean(scorer, 1, seed=9)[:5], model=MODEL, predicted_class=1)
    with pytest.raises(ExplainError) as refused:
        client.score_batch(good[:2] + [bad] + good[2:], timeout=10)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details.startswith("requests[2].alpha:"), refused.value.details
    assert len(client.score_batch(good, timeout=10)) == 4


def test_oversize_score_and_batch_are_refused_and_the_server_keeps_serving(stack, client, scorer):
    with pytest.raises(grpc.RpcError) as refused:
        oversize_score(stack)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    tiny = score_request([0.0], model=MODEL, predicted_class=0)
    with pytest.raises(ExplainError) as too_many:
        client.score_batch([tiny] * (MAX_BATCH + 1), timeout=30)
    assert too_many.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_BATCH}" in too_many.value.details
    alpha = alpha_near_mean(scorer, 0, seed=3)
    assert client.score(alpha, model=MODEL, predicted_class=0, timeout=10).status == explain_pb2.AnomalyReport.OK


# -- broken stores -------------------------------------------------------------------------
def corrupt(store: Path) -> None:
    """Flip bytes inside an array (same size): only the sha256 tells."""
    path = store / "p_high.npy"
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    path.write_bytes(bytes(data))


def truncate(store: Path) -> None:
    path = store / "mean.npy"
    path.write_bytes(path.read_bytes()[:-64])


def other_version(store: Path) -> None:
    """A valid store built for version 2.0 while TorchServe serves 1.0: its digest is
    recomputed, so it loads, and the version check refuses it."""
    from explainserve.anomaly.store import MANIFEST, store_sha256, write_manifest

    path = store / MANIFEST
    manifest = json.loads(path.read_text().replace('"version": "1.0"', '"version": "2.0"'))
    manifest["sha256"] = store_sha256(manifest)
    write_manifest(store, manifest)


BROKEN = {  # case -> (damage, metric reason, text in the report's reason)
    "corrupt": (corrupt, "store refused", "p_high.npy sha256 does not match the manifest (corrupt)"),
    "truncated": (truncate, "store refused", "(truncated or replaced)"),
    "other version": (other_version, "store mismatch", "version '2.0', not 'demo_image' version '1.0'"),
}


@pytest.fixture(scope="module")
def broken_gateways(stack, demo_store, tmp_path_factory):
    """One more sidecar per BROKEN case, in front of the same TorchServe, started together."""
    workdir = tmp_path_factory.mktemp("broken_stores")
    gateways = {}
    try:
        for index, (case, (damage, _, _)) in enumerate(BROKEN.items()):
            store = workdir / f"stores{index}" / MODEL
            shutil.copytree(demo_store, store)
            damage(store)
            gateways[case] = start_gateway(workdir, stack.torchserve.grpc_target, stack.torchserve.management_target,
                                           token_file=stack.torchserve.key_file, log_name=f"gateway{index}.log",
                                           extra_args=("--store-dir", str(store.parent)))
        for process, target, _ in gateways.values():
            wait_serving(target, timeout=60, process=process)
        yield {case: (target, metrics_url, workdir / f"gateway{index}.log")
               for index, (case, (_, target, metrics_url)) in enumerate(gateways.items())}
    finally:
        for process, _, _ in gateways.values():
            stop_gateway(process)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_store_gives_unavailable_anomalies_with_intact_predictions(stack, broken_gateways, scorer, case):
    _, reason_label, reason_text = BROKEN[case]
    target, metrics_url, log_path = broken_gateways[case]
    image = scenes("test", 1)[0]["image"]
    with ExplainClient(target) as broken, ExplainClient(stack.target) as good:
        result = broken.explain(png(image), model=MODEL, methods=["grad_cam"], timeout=60)
        reference = good.explain(png(image), model=MODEL, methods=["grad_cam"], timeout=60)
        assert result.anomaly.status == explain_pb2.AnomalyReport.UNAVAILABLE
        assert result.anomaly.reason.startswith(f"{reason_label}: ") and reason_text in result.anomaly.reason
        assert not result.anomaly.HasField("predicted")
        assert result.classes == reference.classes and result.predicted_class == reference.predicted_class
        np.testing.assert_array_equal(result.maps["grad_cam"].heatmap, reference.maps["grad_cam"].heatmap)

        with pytest.raises(ExplainError) as unavailable:  # a direct scoring call fails outright
            broken.score(alpha_near_mean(scorer, 0, seed=0), model=MODEL, predicted_class=0, timeout=10)
        assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE and reason_text in unavailable.value.details

    wait_for(lambda: health(target, "anomaly") == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    assert health(target, "") == health_pb2.HealthCheckResponse.SERVING  # predictions still served
    text = metrics_text(metrics_url)
    assert metric_value(text, "explainserve_anomaly_unavailable_total", model=MODEL, reason=reason_label) >= 1
    assert metric_value(text, "explainserve_anomaly_verdicts_total", model=MODEL, verdict="unavailable") >= 1
    assert "explainserve_store_info{" not in text
    assert reason_text in log_path.read_text()  # refused with a logged reason


# -- in-process: store folder rules, per-class metrics, serve's unpacking ------------------
def test_per_class_metrics_label_the_counters_and_stay_promtool_clean(demo_store, scorer):
    metrics = GatewayMetrics(per_class=True)
    scoring = AnomalyScoring(metrics, demo_store.parent)
    scoring.load()
    alphas = [alpha_near_mean(scorer, class_id, seed=class_id) for class_id in range(3)]
    for class_id, alpha in enumerate(alphas):
        scoring.score(MODEL, alpha, class_id)
    scoring.score("unserved", np.zeros(128, np.float32), 5)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert metric_value(text, "explainserve_anomaly_verdicts_total", model=MODEL, **{"class": "2"}) == 1
    # Each class's flag counters hold exactly its one answer's flags, as the library counts them.
    for class_id, alpha in enumerate(alphas):
        expected = scorer.score(alpha, class_id)
        labels = {"model": MODEL, "class": str(class_id)}
        assert metric_value(text, "explainserve_anomaly_surprise_flags_total", **labels) == expected.surprise_count[0]
        assert metric_value(text, "explainserve_anomaly_expectation_flags_total", **labels) == expected.expectation_count[0]
    assert 'explainserve_anomaly_expectation_flags_total{class="0",model="demo_image"}' in text
    assert 'explainserve_anomaly_unavailable_total{class="5",model="unserved",reason="no distribution store"} 1.0' in text
    assert 'explainserve_anomaly_beta_count{model="demo_image"} 3.0' in text  # no class on the histogram
    assert 'explainserve_anomaly_verdicts_total{class="7",model="demo_image",verdict="anomalous"}' in text  # from load


def test_serve_unpacks_the_stores_shipped_in_archives(demo_store, tmp_path):
    model_store = tmp_path / "model_store"
    model_store.mkdir()
    with zipfile.ZipFile(model_store / "with_store.mar", "w") as archive:
        archive.writestr("weights.pt", b"")
        for path in demo_store.iterdir():
            archive.write(path, f"distribution_store/{path.name}")
    with zipfile.ZipFile(model_store / "without_store.mar", "w") as archive:
        archive.writestr("weights.pt", b"")
    stores = tmp_path / "run" / "stores"
    (stores / "stale").mkdir(parents=True)
    assert unpack_stores(model_store, ["with_store", "without_store"], stores) == ["with_store"]
    assert sorted(p.name for p in stores.iterdir()) == ["with_store"]
    assert load_store(stores / "with_store").sha256 == load_store(demo_store).sha256


# -- reloading stores while serving --------------------------------------------------------
def altered_store(source: Path, out: Path) -> Path:
    """A valid copy of ``source`` with other P99.9 thresholds, hence another sha256."""
    from explainserve.anomaly.store import MANIFEST, file_sha256, store_sha256, write_manifest

    shutil.copytree(source, out)
    np.save(out / "p_high.npy", np.load(out / "p_high.npy") * np.float32(1.5))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["arrays"]["p_high"]["sha256"] = file_sha256(out / "p_high.npy")
    manifest["sha256"] = store_sha256(manifest)
    write_manifest(out, manifest)
    return out


def put_store(source: Path, stores: Path, name: str = MODEL) -> None:
    """Install ``source`` as ``stores/name`` the documented way: a hidden sibling, then a rename."""
    shutil.copytree(source, stores / f".{name}.tmp")
    os.rename(stores / f".{name}.tmp", stores / name)


def link_store(version: Path, stores: Path, name: str = MODEL) -> None:
    """Point the symlink ``stores/name`` at ``version`` in one rename (replacing the old link)."""
    os.symlink(version, stores / f".{name}.link")
    os.replace(stores / f".{name}.link", stores / name)


def generate_text(metrics: GatewayMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_stores_are_reloaded_when_they_change_appear_or_go(demo_store, scorer, tmp_path):
    stores = tmp_path / "stores"
    stores.mkdir()
    metrics = GatewayMetrics()
    scoring = AnomalyScoring(metrics, stores)
    changes = []
    scoring.on_health_change(changes.append)
    scoring.load()
    assert not scoring.healthy and changes == []
    alpha = alpha_near_mean(scorer, 1, seed=4)

    def report(model=MODEL):
        return scoring.score(model, alpha, 1)

    def exported(name, **labels):
        return metric_value(generate_text(metrics), name, **labels)

    first = shutil.copytree(demo_store, stores / ".versions" / "1")
    link_store(first, stores)  # a new store folder
    scoring.reload()
    assert scoring.healthy and changes == [True]
    assert report().store_sha256 == scorer.store.sha256
    in_flight = scoring.scorer_for(MODEL)
    scoring.reload()  # nothing changed: the same scorer stays in use
    assert scoring.scorer_for(MODEL) is in_flight and changes == [True]

    # replaced by another store (the symlink swapped by a rename): the old sha's info series goes
    other = altered_store(demo_store, stores / ".versions" / "2")
    link_store(other, stores)
    scoring.reload()
    new_sha = load_store(other).sha256
    assert new_sha != scorer.store.sha256 and report().store_sha256 == new_sha
    assert exported("explainserve_store_info", sha256=new_sha) == 1
    assert exported("explainserve_store_info", sha256=scorer.store.sha256) == 0
    assert in_flight.store.sha256 == scorer.store.sha256  # a request that started before keeps its store
    assert in_flight.score(alpha, 1).surprise_count[0] == scorer.score(alpha, 1).surprise_count[0]

    os.remove(stores / MODEL)  # removed
    scoring.reload()
    removed = report()
    assert removed.status == explain_pb2.AnomalyReport.UNAVAILABLE
    assert removed.reason.startswith("store removed: ") and "was removed from --store-dir" in removed.reason
    assert not scoring.healthy and changes == [True, False]
    assert "explainserve_store_info{" not in generate_text(metrics)

    put_store(demo_store, stores)  # restored
    scoring.reload()
    assert report().status == explain_pb2.AnomalyReport.OK and scoring.healthy and changes == [True, False, True]
    corrupt(stores / MODEL)  # damaged in place
    scoring.reload()
    refused = report()
    assert refused.reason.startswith("store refused: ") and "p_high.npy sha256 does not match" in refused.reason
    assert changes == [True, False, True, False] and "explainserve_store_info{" not in generate_text(metrics)
    assert exported("explainserve_anomaly_unavailable_total", model=MODEL, reason="store removed") == 1
    assert exported("explainserve_anomaly_unavailable_total", model=MODEL, reason="store refused") == 1

    # written in place, file by file: refused while half-written, loaded once complete
    shutil.rmtree(stores / MODEL)
    (stores / MODEL).mkdir()
    files = sorted(demo_store.iterdir())
    for file in files[:-2]:
        shutil.copy(file, stores / MODEL)
    scoring.reload()
    assert report().status == explain_pb2.AnomalyReport.UNAVAILABLE and not scoring.healthy
    for file in files[-2:]:
        shutil.copy(file, stores / MODEL)
    scoring.reload()
    assert report().store_sha256 == scorer.store.sha256 and scoring.healthy

    scoring.model_served(MODEL, "1.1")  # TorchServe serves another version: refused, also after a forced reload
    scoring.reload(force=True)
    assert report().reason.startswith("store mismatch: ") and not scoring.healthy


def anomaly_health(target: str):
    """The `anomaly` health status, None while the gateway does not answer."""
    try:
        return health(target, "anomaly")
    except grpc.RpcError:
        return None


def test_a_running_sidecar_reloads_its_stores_on_sighup(demo_store, scorer, tmp_path):
    """With --store-poll-interval 0 only SIGHUP reloads; no TorchServe is needed for Score."""
    stores = tmp_path / "stores"
    stores.mkdir()
    put_store(demo_store, stores)
    nowhere = f"127.0.0.1:{free_port()}"
    process, target, metrics_url = start_gateway(tmp_path, nowhere, nowhere, extra_args=(
        "--store-dir", str(stores), "--store-poll-interval", "0"))
    alpha = alpha_near_mean(scorer, 2, seed=7)
    serving, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        wait_for(lambda: anomaly_health(target) == serving, timeout=60)
        with ExplainClient(target) as client:
            assert client.score(alpha, model=MODEL, predicted_class=2, timeout=10).status == explain_pb2.AnomalyReport.OK
            corrupt(stores / MODEL)
            time.sleep(0.5)
            assert client.score(alpha, model=MODEL, predicted_class=2, timeout=10).status == explain_pb2.AnomalyReport.OK
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: anomaly_health(target) == down, timeout=20)
            with pytest.raises(ExplainError) as unavailable:
                client.score(alpha, model=MODEL, predicted_class=2, timeout=10)
            assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
            assert "p_high.npy sha256 does not match" in unavailable.value.details
            shutil.rmtree(stores / MODEL)
            put_store(demo_store, stores)
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: anomaly_health(target) == serving, timeout=20)
            report = client.score(alpha, model=MODEL, predicted_class=2, timeout=10)
            assert report.status == explain_pb2.AnomalyReport.OK and report.store_sha256 == scorer.store.sha256
        assert metric_value(metrics_text(metrics_url), "explainserve_store_info", sha256=scorer.store.sha256) == 1
        log_text = (tmp_path / "gateway.log").read_text()
        assert log_text.count("sha256 does not match") == 1 and "reloaded from" in log_text
    finally:
        stop_gateway(process)
