"""End to end through a real TorchServe and a real gateway: maps, batching, clips, plain requests."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import urllib.request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from explainserve.client import ExplainClient, ExplainError, build_request
from explainserve.explainer import ExplainOptions
from explainserve.wire import HANDLER_REQUEST_KEY
from explainserve._generated import handler_pb2, inference_pb2, inference_pb2_grpc
from support.serving_harness import (CLIP_SIZE, explainer_for, png, random_image, stack_for_module, tiny_image_model,
                             tiny_video_model)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
IMAGE_METHODS = ["swag_i", "swag_g", "swag_i_g", "jitter_cam", "grad_cam"]
VIDEO_METHODS = ["swag_v_i", "swag_v_g", "swag_v_i_g", "grad_cam"]


@pytest.fixture(scope="module")
def models():
    return {"image": tiny_image_model(), "video": tiny_video_model(),
            "three": tiny_image_model("three_classes", n_classes=3)}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, models):
    yield from stack_for_module(request, tmp_path_factory.mktemp("serving"), list(models.values()),
                                batch_size=4, max_batch_delay_ms=300, gateway_args=("--reflection",))


@pytest.fixture(scope="module")
def client(stack):
    with ExplainClient(stack.target) as client:
        yield client


def assert_maps_match_library(result, expected, methods):
    for method in methods:
        served, reference = result.maps[method], expected.maps[method]
        assert served.heatmap.shape == reference.heatmap.shape
        # uint8 quantisation: half a step, plus float noise between two processes
        tolerance = served.quantisation_step / 2 + 1e-4 * float(np.ptp(reference.heatmap)) + 1e-7
        assert np.abs(served.heatmap - reference.heatmap).max() <= tolerance, method
        if reference.segments is not None:
            assert np.array_equal(served.segments, reference.segments), method
            np.testing.assert_allclose(served.segment_scores, reference.segment_scores, rtol=1e-4, atol=1e-7)


def test_every_image_method_round_trips_and_equals_the_library(client, models):
    model, metadata = models["image"]
    image = random_image(0)
    result = client.explain(png(image), model="tiny_image", methods=IMAGE_METHODS, timeout=120, top_k=3)
    expected = explainer_for(model, metadata).explain([image], IMAGE_METHODS, ExplainOptions(top_k=3))[0]

    assert [index for index, _, _ in result.classes] == expected.classes.tolist()
    np.testing.assert_allclose([score for _, _, score in result.classes], expected.scores, rtol=1e-4)
    assert result.classes[0][1] == metadata["class_names"][expected.predicted]
    assert result.predicted_class == result.target_class == expected.predicted
    assert sorted(result.maps) == sorted(IMAGE_METHODS)
    for method in IMAGE_METHODS:
        assert result.maps[method].heatmap.shape == tuple(metadata["input_size"])
    assert_maps_match_library(result, expected, IMAGE_METHODS)
    assert result.anomaly.status == result.anomaly.UNAVAILABLE and result.anomaly.reason
    assert result.timings["network"] > 0 and result.timings["total"] >= result.timings["network"]


def test_options_and_target_class_reach_the_library(client, models):
    model, metadata = models["image"]
    image = random_image(1)
    result = client.explain(image, model="tiny_image", methods=["swag_g", "jitter_cam"], n_segments=20, wg=6.0,
                            jitter_d=1, target_class=4, timeout=120)
    options = ExplainOptions(n_segments=20, wg=6.0, jitter_d=1)
    expected = explainer_for(model, metadata).explain([image], ["swag_g", "jitter_cam"], options, targets=[4])[0]
    assert result.target_class == 4
    assert_maps_match_library(result, expected, ["swag_g", "jitter_cam"])


def test_clip_round_trips_raw_and_as_frames(client, models):
    model, metadata = models["video"]
    clip = np.random.default_rng(3).integers(0, 256, (CLIP_SIZE[0], 40, 36, 3), dtype=np.uint8)
    expected = explainer_for(model, metadata).explain([clip], VIDEO_METHODS, ExplainOptions(n_segments=30))[0]
    for data in (clip, [png(frame) for frame in clip]):
        result = client.explain(data, model="tiny_video", methods=VIDEO_METHODS, n_segments=30, timeout=120)
        for method in VIDEO_METHODS:
            assert result.maps[method].heatmap.shape == CLIP_SIZE
        assert result.predicted_class == expected.predicted
        assert_maps_match_library(result, expected, VIDEO_METHODS)


def test_concurrent_clients_are_batched_and_each_get_their_own_answer(stack, models):
    model, metadata = models["image"]
    images = [random_image(10 + i) for i in range(4)]
    targets = [0, 1, 2, 3]
    expected = explainer_for(model, metadata).explain(images, ["grad_cam"], ExplainOptions(top_k=6), targets=targets)

    def call(i):
        with ExplainClient(stack.target) as own_client:
            return own_client.explain(images[i], model="tiny_image", methods=["grad_cam"], target_class=targets[i],
                                      top_k=6, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert max(result.timings["batch_size"] for result in results) > 1, "no two requests shared a batch"
    for result, reference, target in zip(results, expected, targets):
        assert result.target_class == target
        assert [index for index, _, _ in result.classes] == reference.classes.tolist()
        np.testing.assert_allclose([score for _, _, score in result.classes], reference.scores, rtol=1e-4)
        assert_maps_match_library(result, reference, ["grad_cam"])


def torchserve_predict(stack, inputs: dict, model: str = "tiny_image") -> bytes:
    with grpc.insecure_channel(stack.torchserve.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        return stub.Predictions(inference_pb2.PredictionsRequest(model_name=model, input=inputs),
                                timeout=120).prediction


def test_plain_torchserve_request_returns_the_default_methods(stack, models):
    model, metadata = models["image"]
    image = random_image(20)
    answer = json.loads(torchserve_predict(stack, {"data": png(image)}))
    expected = explainer_for(model, metadata).explain([image])[0]
    assert answer["predicted_class"] == expected.predicted
    assert sorted(answer["explanations"]) == ["jitter_cam", "swag_i_g"]
    for method, explanation in answer["explanations"].items():
        np.testing.assert_allclose(np.array(explanation["heatmap"]), expected.maps[method].heatmap,
                                   atol=1e-4 * float(np.ptp(expected.maps[method].heatmap)) + 1e-5)


def test_plain_torchserve_clip_request_takes_a_npy_file(stack, models):
    model, metadata = models["video"]
    clip = np.random.default_rng(4).integers(0, 256, (CLIP_SIZE[0], 32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, clip)
    answer = json.loads(torchserve_predict(stack, {"data": buffer.getvalue()}, model="tiny_video"))
    expected = explainer_for(model, metadata).explain([clip])[0]
    assert answer["predicted_class"] == expected.predicted
    assert list(answer["explanations"]) == ["swag_v_i_g"]
    assert answer["explanations"]["swag_v_i_g"]["shape"] == list(CLIP_SIZE)
    wrong_length = io.BytesIO()
    np.save(wrong_length, clip[:2])
    error = json.loads(torchserve_predict(stack, {"data": wrong_length.getvalue()}, model="tiny_video"))["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "frames" in error["message"]


def test_one_bad_item_in_a_batch_fails_alone(stack):
    good = [build_request(random_image(30 + i), model="tiny_image", methods=["grad_cam"]) for i in range(3)]
    bad = build_request(random_image(33), model="tiny_image", methods=["grad_cam"], target_class=99)
    requests = good[:2] + [bad] + good[2:]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda r: handler_pb2.HandlerResponse.FromString(
            torchserve_predict(stack, {HANDLER_REQUEST_KEY: r.SerializeToString()})), requests))
    kinds = [answer.WhichOneof("result") for answer in answers]
    assert kinds == ["response", "response", "error", "response"]
    assert answers[2].error.code == 3 and "target" in answers[2].error.message
    assert max(answer.response.timings.batch_size for answer in answers if answer.HasField("response")) > 1
    plain = [torchserve_predict(stack, {"data": b"not an image"})]
    assert json.loads(plain[0])["error"]["code"] == "INVALID_ARGUMENT"


def test_health_and_reflection(stack):
    with grpc.insecure_channel(stack.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="explainserve.v1.Explainer"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "explainserve.v1.Explainer" in services and "grpc.health.v1.Health" in services


def test_metrics_are_promtool_clean_and_count_requests(stack, client, tmp_path):
    client.explain(random_image(40), model="tiny_image", timeout=60)
    text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'explainserve_requests_total{code="OK",method="predict",rpc="Explain"}' in text
    assert "explainserve_torchserve_up 1.0" in text
    assert 'explainserve_torchserve_workers{model="tiny_image",status="READY"} 1.0' in text
    assert 'explainserve_request_duration_seconds_bucket{le="2.5",method="predict",rpc="Explain"}' in text
    assert 'explainserve_torchserve_duration_seconds_count{method="predict"}' in text
    # no --store-dir: every answer is counted unscored, with its reason
    assert 'explainserve_anomaly_verdicts_total{model="tiny_image",verdict="unavailable"}' in text
    assert 'explainserve_anomaly_unavailable_total{model="tiny_image",reason="no distribution store"}' in text
    for name in ("explainserve_anomaly_beta", "explainserve_anomaly_scoring_duration_seconds", "explainserve_store_info",
                 "explainserve_anomaly_surprise_flags_total", "explainserve_store_build_timestamp_seconds",
                 "explainserve_store_classes_never_anomalous"):
        assert f"# TYPE {name} " in text


def test_score_rpcs_answer_unavailable_without_a_store(stack):
    from explainserve._generated import explain_pb2, explain_pb2_grpc

    with grpc.insecure_channel(stack.target) as channel:
        stub = explain_pb2_grpc.ExplainerStub(channel)
        request = explain_pb2.ScoreRequest(model="tiny_image", alpha=[0.1] * 512, predicted_class=1)
        refusals = {}
        for name, call in (("score", lambda: stub.Score(request, timeout=10)),
                           ("batch", lambda: stub.ScoreBatch(explain_pb2.ScoreBatchRequest(requests=[request] * 2),
                                                             timeout=10)),
                           ("no alpha", lambda: stub.Score(explain_pb2.ScoreRequest(model="tiny_image"), timeout=10)),
                           ("unknown model", lambda: stub.Score(explain_pb2.ScoreRequest(model="nope", alpha=[0.1]),
                                                                timeout=10))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            refusals[name] = (refused.value.code(), refused.value.details())
    assert refusals["score"] == (grpc.StatusCode.UNAVAILABLE, "model: no distribution store")
    assert refusals["batch"] == (grpc.StatusCode.UNAVAILABLE, "requests[0].model: no distribution store")
    assert refusals["no alpha"][0] == grpc.StatusCode.INVALID_ARGUMENT and "alpha" in refusals["no alpha"][1]
    assert refusals["unknown model"] == (grpc.StatusCode.INVALID_ARGUMENT, "model: unknown model 'nope'")


def test_explain_command_prints_classes_and_writes_the_overlay(stack, tmp_path):
    from PIL import Image

    image_path, overlay_path = tmp_path / "input.png", tmp_path / "overlay.png"
    image = random_image(50)
    image_path.write_bytes(png(image))
    run = subprocess.run(
        [sys.executable, "-m", "explainserve.cli", "explain", str(image_path), "--model", "tiny_image",
         "--method", "swag_i_g", "--method", "grad_cam", "--target", stack.target, "--top-k", "2",
         "--out", str(overlay_path)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("thing") == 2 and "timings:" in run.stdout and "UNAVAILABLE" in run.stdout
    picture = np.asarray(Image.open(overlay_path))
    title = picture.shape[0] - 4 * 72  # the band naming the method and class
    assert 0 < title < 40 and picture.shape[1] > 2 * 4 * 80  # original | explanation | colour bar
    assert np.array_equal(picture[title:, :4 * 80], image.repeat(4, 0).repeat(4, 1))  # enlarged to at least 256 a side
    # the second method's picture beside it: the same original, another map
    assert f"grad_cam picture -> {tmp_path / 'overlay_grad_cam.png'}" in run.stdout
    second = np.asarray(Image.open(tmp_path / "overlay_grad_cam.png"))
    assert second.shape == picture.shape and np.array_equal(second[title:, :4 * 80], picture[title:, :4 * 80])
    assert not np.array_equal(second[title:, 4 * 80:], picture[title:, 4 * 80:])


def test_a_three_class_model_answers_every_default(stack, client, models, tmp_path):
    # top_k unset means min(5, number of classes) in the client, the CLI, the gateway and the
    # handler alike; an explicit top_k above the class count is refused with the range.
    model, metadata = models["three"]
    image = random_image(52)
    result = client.explain(png(image), model="three_classes", timeout=120)
    expected = explainer_for(model, metadata).explain([image], [])[0]
    assert [index for index, _, _ in result.classes] == expected.classes.tolist() and len(expected.classes) == 3
    image_path = tmp_path / "input.png"
    image_path.write_bytes(png(image))
    run = subprocess.run([sys.executable, "-m", "explainserve.cli", "explain", str(image_path), "--model", "three_classes",
                          "--target", stack.target], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("thing") == 3
    with pytest.raises(ExplainError) as refused:
        client.explain(png(image), model="three_classes", top_k=4, timeout=120)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k: must be in [1, 3]" in str(refused.value)
