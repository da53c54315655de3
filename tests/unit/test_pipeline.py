"""The gateway's Explain and Score logic (ExplainPipeline) with the real handler in-process and
no TorchServe: validation before any forward, deadlines, status mapping, scoring, regions."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from explainserve._generated import explain_pb2, handler_pb2
from explainserve.client import build_request, score_request
from explainserve.sidecar.metrics import GatewayMetrics
from explainserve.sidecar.pipeline import (INLINE_COLUMN_SCORES, INLINE_SCORES, ExplainPipeline, RpcFailure,
                                           off_loop_if_large)
from explainserve.sidecar.scoring import MAX_BATCH, AnomalyScoring
from explainserve.wire import DEADLINE_KEY, HANDLER_REQUEST_KEY, REGION_REQUEST_KEY, to_numpy
from support.fake_torchserve import FakeCatalog, FakeTorchServe, image_handler, rpc_error
from support.serving_harness import explainer_for, png, random_image, tiny_image_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, metadata = tiny_image_model()
    return model, metadata, image_handler(model, metadata, tmp_path_factory.mktemp("archive"))


@pytest.fixture
def pipeline(served):
    handler = served[2]
    observed = []
    pipeline = ExplainPipeline(FakeTorchServe(handler), FakeCatalog(handler), AnomalyScoring(GatewayMetrics()),
                               observe_torchserve=lambda label, seconds: observed.append((label, seconds)),
                               default_timeout=30.0)
    pipeline.observed = observed
    return pipeline


def failure(coroutine) -> RpcFailure:
    with pytest.raises(RpcFailure) as failed:
        asyncio.run(coroutine)
    return failed.value


def test_explain_forwards_once_and_answers_the_handlers_maps(pipeline, served):
    model, metadata, _ = served
    image = random_image(7)
    request = build_request(png(image), model="tiny_image", methods=["grad_cam"], label=2)
    before = time.time()
    response = asyncio.run(pipeline.explain(request, lambda: 5.0, label="grad_cam"))
    expected = explainer_for(model, metadata).explain([image], ["grad_cam"], labels=[2])[0]
    assert [c.index for c in response.classes] == expected.classes.tolist() and len(response.classes) == 5
    heatmap = to_numpy(response.explanations[0].heatmap)
    assert np.abs(heatmap - expected.maps["grad_cam"].heatmap).max() <= response.explanations[0].heatmap.scale / 2 + 1e-6
    # No store for the model: the report says so, the call still succeeds.
    assert response.anomaly.status != explain_pb2.AnomalyReport.OK
    assert response.timings.total >= response.timings.gateway >= 0 and response.timings.total > 0
    (forwarded, timeout), = pipeline.torchserve.calls
    assert timeout == 5.0 and forwarded.input[HANDLER_REQUEST_KEY] == request.SerializeToString()
    # The deadline travels rounded to the millisecond, so it may lie half a millisecond either side (1 ms allowed).
    assert before + 5.0 - 1e-3 <= float(forwarded.input[DEADLINE_KEY]) <= time.time() + 5.0 + 1e-3
    assert [label for label, _ in pipeline.observed] == ["grad_cam"]


def test_no_deadline_takes_the_default_timeout(pipeline):
    asyncio.run(pipeline.explain(build_request(png(random_image(8)), model="tiny_image")))
    assert pipeline.torchserve.calls[0][1] == 30.0


@pytest.mark.parametrize(("fields", "code", "message"), [
    ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model: the request names no model"),
    ({"model": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "model: unknown model 'nope'"),
    ({"top_k": 7}, grpc.StatusCode.INVALID_ARGUMENT, "top_k: must be in [1, 6]"),
    ({"methods": ["swag_v_i"]}, grpc.StatusCode.INVALID_ARGUMENT, "methods: ['swag_v_i'] not available"),
    ({"jitter_d": 9}, grpc.StatusCode.INVALID_ARGUMENT, "options.jitter_d: must be in [0, 8]"),
])
def test_bad_requests_are_refused_before_any_forward(pipeline, fields, code, message):
    request = build_request(png(random_image(9)), **{"model": "tiny_image", **fields})
    refused = failure(pipeline.explain(request))
    assert refused.code == code and message in refused.message
    assert pipeline.torchserve.calls == []


def test_an_oversized_image_is_resource_exhausted_from_its_header(pipeline):
    refused = failure(pipeline.explain(build_request(png(np.zeros((8, 8193, 3), np.uint8)), model="tiny_image")))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and pipeline.torchserve.calls == []


@pytest.mark.parametrize(("handler_code", "status"), [
    (3, grpc.StatusCode.INVALID_ARGUMENT), (4, grpc.StatusCode.DEADLINE_EXCEEDED),
    (8, grpc.StatusCode.RESOURCE_EXHAUSTED), (13, grpc.StatusCode.INTERNAL), (99, grpc.StatusCode.INTERNAL),
])
def test_a_handler_error_is_answered_with_its_status(pipeline, handler_code, status):
    pipeline.torchserve.answer = handler_pb2.HandlerResponse(
        error=handler_pb2.HandlerError(code=handler_code, message="said the handler")).SerializeToString()
    refused = failure(pipeline.explain(build_request(png(random_image(10)), model="tiny_image")))
    assert (refused.code, refused.message) == (status, "said the handler")


@pytest.mark.parametrize(("code", "details", "status"), [
    (grpc.StatusCode.UNAVAILABLE, "connection refused", grpc.StatusCode.UNAVAILABLE),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Worker died.", grpc.StatusCode.UNAVAILABLE),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (grpc.StatusCode.PERMISSION_DENIED, "bad key", grpc.StatusCode.UNAVAILABLE),
    (grpc.StatusCode.NOT_FOUND, "Model not found", grpc.StatusCode.INVALID_ARGUMENT),
    (grpc.StatusCode.UNKNOWN, "??", grpc.StatusCode.INTERNAL),
])
def test_torchserve_failures_are_mapped(pipeline, code, details, status):
    pipeline.torchserve.fail = rpc_error(code, details)
    refused = failure(pipeline.explain(build_request(png(random_image(11)), model="tiny_image")))
    assert refused.code == status and (details in refused.message or "unknown model" in refused.message)


def anomalous_report(*alphas_and_filters, label: bool = False) -> explain_pb2.AnomalyReport:
    """A report whose predicted (or label) verdict is ANOMALOUS with these surprising filters."""
    verdict = explain_pb2.ClassVerdict(class_index=1, verdict=explain_pb2.ClassVerdict.ANOMALOUS)
    for alpha, filter_id in alphas_and_filters:
        verdict.surprising_filters.add(filter=filter_id, alpha=alpha, exemplars=[40 + filter_id])
    report = explain_pb2.AnomalyReport()
    (report.label if label else report.predicted).CopyFrom(verdict)
    return report


def test_the_region_of_the_first_live_surprising_filter(pipeline, served):
    model, metadata, _ = served
    image = random_image(12)
    request = build_request(png(image), model="tiny_image", label=3)
    report = anomalous_report((0.0, 5), (0.25, 7))  # filter 5 is silent: no region drives it
    asyncio.run(pipeline.region(request, report, 10.0))
    region = report.predicted.surprise_region
    assert region.filter == 7 and list(region.exemplars) == [47] and region.HasField("suppression")
    expected = explainer_for(model, metadata).filter_regions([image], [7], targets=[1])[0]
    assert region.top_segment == expected.top_segment
    (forwarded, timeout), = pipeline.torchserve.calls
    asked = handler_pb2.RegionRequest.FromString(forwarded.input[REGION_REQUEST_KEY])
    assert [(f.filter, f.class_index) for f in asked.filters] == [(7, 1)] and asked.suppression_steps > 0
    assert timeout == 10.0 and region.suppression.label_restored == (
        region.suppression.prediction_changed and region.suppression.predicted_after == 3)


def test_region_failures_are_written_into_the_verdict(pipeline):
    request = build_request(png(random_image(13)), model="tiny_image")
    silent, none, late, down = (anomalous_report((0.0, 5)), anomalous_report(), anomalous_report((0.5, 2)),
                                anomalous_report((0.5, 2), label=True))
    asyncio.run(pipeline.region(request, silent, 10.0))
    asyncio.run(pipeline.region(request, none, 10.0))
    asyncio.run(pipeline.region(request, late, 0.0))
    assert pipeline.torchserve.calls == []
    pipeline.torchserve.fail = rpc_error(grpc.StatusCode.UNAVAILABLE, "gone")
    asyncio.run(pipeline.region(request, down, 10.0))
    assert "silent" in silent.predicted.surprise_region_unavailable
    assert "no surprising filter" in none.predicted.surprise_region_unavailable
    assert "no time left" in late.predicted.surprise_region_unavailable
    assert down.label.surprise_region_unavailable == "region call failed: TorchServe: UNAVAILABLE: gone"


def test_explain_asks_for_regions_only_when_told(pipeline):
    # No store, so no ANOMALOUS verdict: asking costs no second call.
    request = build_request(png(random_image(14)), model="tiny_image", explain_anomaly=True)
    asyncio.run(pipeline.explain(request, lambda: 10.0))
    assert len(pipeline.torchserve.calls) == 1


def test_score_requests_are_checked_before_scoring(pipeline):
    alpha = np.zeros(512, np.float32)
    too_many = [score_request(alpha, model="tiny_image", predicted_class=0)] * (MAX_BATCH + 1)
    assert failure(pipeline.score_requests(too_many, batch=True)).code == grpc.StatusCode.INVALID_ARGUMENT
    unknown = failure(pipeline.score_requests([score_request(alpha, model="nope", predicted_class=0)], batch=True))
    assert (unknown.code, unknown.message) == (grpc.StatusCode.INVALID_ARGUMENT, "requests[0].model: unknown model 'nope'")
    no_store = failure(pipeline.score_requests([score_request(alpha, model="tiny_image", predicted_class=0)], batch=False))
    assert no_store.code == grpc.StatusCode.UNAVAILABLE and "no distribution store" in no_store.message


@pytest.mark.parametrize("limit", [INLINE_SCORES, INLINE_COLUMN_SCORES])
def test_scoring_leaves_the_event_loop_only_above_its_limit(limit):
    async def thread_of(values):
        return await off_loop_if_large(values, limit, lambda name: (name, threading.get_ident()), "work")

    async def main():
        loop_thread = threading.get_ident()
        assert await thread_of(limit) == ("work", loop_thread)
        name, worker = await thread_of(limit + 1)
        assert name == "work" and worker != loop_thread
    asyncio.run(main())
    # a 256 x 2048 ScoreColumns call stays on the loop; as many per-row verdicts do not
    assert INLINE_SCORES < 256 * 2048 <= INLINE_COLUMN_SCORES
