"""Surprise regions (thesis 6.3.2) through a real TorchServe and the gateway: asked per request or
by the gateway's --explain-anomaly default, only for ANOMALOUS verdicts, equal to the library."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest

from explainserve._generated import explain_pb2, handler_pb2, inference_pb2, inference_pb2_grpc
from explainserve.client import ExplainClient, build_request
from explainserve.commands import archive
from explainserve.commands.archive import demo_model
from explainserve.sidecar.local import wait_serving
from explainserve.sidecar.service import region_filter
from explainserve.data.scenes import FashionScenes
from explainserve.wire import HANDLER_REQUEST_KEY, REGION_REQUEST_KEY, to_numpy
from support.serving_harness import explainer_for, png, stack_for_module, start_gateway, stop_gateway
# The same served stack as the anomaly tests: the demo image model and a small calibrated store.
from test_sidecar_anomaly import client, demo_store, stack  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MODEL = "demo_image"
SIDE = 64
ANOMALOUS = explain_pb2.ClassVerdict.ANOMALOUS


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """Uniform noise: ANOMALOUS with surprising filters for the demo model."""
    return np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def test_an_anomalous_verdict_carries_the_region_of_its_most_surprising_filter(stack, client, noise):
    result = client.send(build_request(png(noise), model=MODEL, label=2, explain_anomaly=True), timeout=60)
    model, metadata = demo_model("image")
    explainer = explainer_for(model, metadata)
    for verdict in (result.anomaly.predicted, result.anomaly.label):
        assert verdict.verdict == ANOMALOUS and verdict.surprising_filters, verdict
        flag, region = region_filter(verdict), verdict.surprise_region
        assert flag is not None and flag.alpha != 0
        assert (region.filter, region.class_index) == (flag.filter, verdict.class_index)
        assert max(to_numpy(region.segment_scores)) > 0, "a blank region map"
        assert list(region.exemplars) == list(flag.exemplars) and len(region.exemplars) > 0
        assert not verdict.surprise_region_unavailable
        [expected] = explainer.filter_regions([noise], [flag.filter], targets=[verdict.class_index])
        segments = to_numpy(region.segments)
        assert segments.shape == (SIDE, SIDE) and np.array_equal(segments, expected.segments)
        np.testing.assert_allclose(to_numpy(region.segment_scores), expected.segment_scores, rtol=1e-3, atol=1e-9)
        assert region.top_segment == expected.top_segment
        assert np.abs(to_numpy(region.heatmap) - expected.heatmap).max() <= region.heatmap.scale / 2 + 1e-6
        # With a label the counterfactual comes along (thesis 6.4.1), equal to the library's.
        [suppressed] = explainer.suppress_surprise([noise], [expected])
        suppression = region.suppression
        assert list(suppression.deleted_segments) == suppressed.deleted_segments.tolist()
        assert suppression.deleted_segments[0] == region.top_segment
        assert list(suppression.predicted) == suppressed.predicted.tolist()
        np.testing.assert_allclose(suppression.probabilities, suppressed.probabilities, rtol=1e-4, atol=1e-6)
        assert suppression.prediction_changed == suppressed.changed
        assert suppression.predicted_after == suppressed.predicted_after
        assert suppression.label_restored == (suppressed.changed and suppressed.predicted_after == 2)
    assert result.anomaly.label.class_index == 2


def test_the_region_skips_silent_filters():
    """A filter with alpha == 0 (zero activation everywhere) can be surprising when its training
    scores are all negative, but no pixel acts through it: the region is the next filter's."""
    def flag(number, alpha):
        return explain_pb2.FilterFlag(filter=number, alpha=alpha, threshold=-4e-5, exemplars=[number])

    verdict = explain_pb2.ClassVerdict(surprising_filters=[flag(19, 0.0), flag(27, -3e-5), flag(35, 2e-4)])
    assert region_filter(verdict).filter == 27
    assert region_filter(explain_pb2.ClassVerdict(surprising_filters=[flag(19, 0.0)])) is None
    assert region_filter(explain_pb2.ClassVerdict()) is None


def test_no_region_unless_asked_or_for_a_normal_verdict(client, noise):
    plain = client.send(build_request(png(noise), model=MODEL), timeout=60)
    assert plain.anomaly.predicted.verdict == ANOMALOUS
    unlabelled = client.send(build_request(png(noise), model=MODEL, explain_anomaly=True), timeout=60).anomaly.predicted
    assert unlabelled.HasField("surprise_region") and not unlabelled.surprise_region.HasField("suppression")
    assert not plain.anomaly.predicted.HasField("surprise_region")
    assert not plain.anomaly.predicted.surprise_region_unavailable
    scenes = FashionScenes("test", seed=5, size=12, image_size=SIDE)
    normal = [client.send(build_request(png(scenes[i]["image"]), model=MODEL, explain_anomaly=True), timeout=60)
              for i in range(len(scenes))]
    normal = [r.anomaly.predicted for r in normal if r.anomaly.predicted.verdict != ANOMALOUS]
    assert normal, "no NORMAL verdict among the in-distribution scenes"
    assert not any(v.HasField("surprise_region") or v.surprise_region_unavailable for v in normal)


def test_the_gateway_default_applies_when_the_request_leaves_the_field_unset(stack, noise):
    process, target, _ = start_gateway(stack.workdir, stack.torchserve.grpc_target, stack.torchserve.management_target,
                                       extra_args=("--store-dir", str(stack.workdir / "stores"), "--explain-anomaly"),
                                       log_name="gateway_default.log")
    try:
        wait_serving(target, timeout=60, process=process)
        with ExplainClient(target) as client:
            default = client.send(build_request(png(noise), model=MODEL), timeout=60).anomaly.predicted
            refused = client.send(build_request(png(noise), model=MODEL, explain_anomaly=False), timeout=60).anomaly.predicted
    finally:
        stop_gateway(process)
    assert default.verdict == ANOMALOUS and default.surprise_region.filter == region_filter(default).filter
    assert default.surprise_region.segments.shape == [SIDE, SIDE]
    assert not refused.HasField("surprise_region")


@pytest.mark.parametrize("region, message", [
    (handler_pb2.RegionRequest(filters=[handler_pb2.FilterTarget(filter=10_000)]), "filter: must be in [0,"),
    (handler_pb2.RegionRequest(filters=[handler_pb2.FilterTarget(filter=1)], suppression_steps=101),
     "suppression_steps: must be in [0, 100], got 101"),
], ids=["filter", "suppression steps"])
def test_the_handler_region_path_through_torchserve_rejects_bad_fields(stack, noise, region, message):
    with grpc.insecure_channel(stack.torchserve.grpc_target) as channel:
        answer = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(inference_pb2.PredictionsRequest(
            model_name=MODEL, input={HANDLER_REQUEST_KEY: build_request(png(noise), model=MODEL).SerializeToString(),
                                     REGION_REQUEST_KEY: region.SerializeToString()}), timeout=60)
    error = handler_pb2.HandlerResponse.FromString(answer.prediction).error
    assert error.code == 3 and message in error.message, error.message


HANDLER_DELAY_S = 3.0


@pytest.fixture(scope="module")
def slow_stack(request, tmp_path_factory):
    """The demo image model behind a handler that sleeps HANDLER_DELAY_S on every call, with its
    committed distribution store."""
    workdir = tmp_path_factory.mktemp("region_slow")
    shutil.copytree(archive.demo_store("image")[0], workdir / "stores" / MODEL)  # the committed store
    yield from stack_for_module(request, workdir, [demo_model("image")], batch_size=1, max_batch_delay_ms=1,
                                env={"EXPLAINSERVE_TEST_HANDLER_DELAY_S": str(HANDLER_DELAY_S)},
                                gateway_args=("--store-dir", str(workdir / "stores")))


def test_a_region_call_that_misses_the_deadline_leaves_the_answer_intact(slow_stack):
    """The Explain call fits the client's deadline, the extra region call does not: the answer
    arrives in time with its maps and verdict, and the verdict says why it has no region."""
    # ANOMALOUS against the committed store, with a surprising filter that is not silent.
    scene = png(FashionScenes("ood_backgrounds", size=4)[3]["image"])
    deadline = 2 * HANDLER_DELAY_S - 0.5
    with ExplainClient(slow_stack.target) as client:
        started = time.monotonic()
        result = client.send(build_request(scene, model=MODEL, methods=["grad_cam"], explain_anomaly=True),
                             timeout=deadline)
        elapsed = time.monotonic() - started
        verdict = result.anomaly.predicted
        assert verdict.verdict == ANOMALOUS and region_filter(verdict) is not None
        assert not verdict.HasField("surprise_region")
        assert verdict.surprise_region_unavailable.startswith("region call failed: "), verdict.surprise_region_unavailable
        assert "DEADLINE_EXCEEDED" in verdict.surprise_region_unavailable or "no time left" in verdict.surprise_region_unavailable
        assert result.maps["grad_cam"].heatmap.shape == (SIDE, SIDE)
        assert HANDLER_DELAY_S <= elapsed < deadline
        # The gateway keeps serving: a deadline long enough for both calls gets the region.
        served = client.send(build_request(scene, model=MODEL, explain_anomaly=True), timeout=4 * HANDLER_DELAY_S + 30)
        assert served.anomaly.predicted.HasField("surprise_region")
