"""Admission control and connection ageing of a real gateway in front of the shared fault TorchServe.

Maximum-size images (4096 x 4096, a second or more of decoding and resizing in the handler on
this machine) keep a call at work long enough to fill the gateway's one slot and its queue.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explainserve.client import ExplainClient, ExplainError
from support.fault_load import MODEL
from support.serving_harness import health, png, start_gateway, stop_gateway, wait_for
from test_sidecar_anomaly import metric_value, metrics_text

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MAX_IMAGE = png(np.zeros((4096, 4096, 3), np.uint8))  # 49 kB that decode to 48 MiB


@pytest.fixture
def one_slot_gateway(fault_stack, tmp_path):
    """A gateway that works on one call at a time and lets one more wait."""
    process, target, metrics_url = start_gateway(
        tmp_path, fault_stack.torchserve.grpc_target, fault_stack.torchserve.management_target,
        token_file=fault_stack.torchserve.key_file,
        extra_args=("--max-concurrent-requests", "1", "--max-queued-requests", "1", "--max-connection-age", "1"))
    try:
        wait_for(lambda: health(target) == health_pb2.HealthCheckResponse.SERVING, timeout=60)
        yield target, metrics_url
    finally:
        stop_gateway(process)


def concurrent_calls(target: str, timeouts: list[float],
                     methods: tuple[str, ...] = ("grad_cam",)) -> list[tuple[grpc.StatusCode, str, float]]:
    """One Explain of the maximum-size image per timeout, all sent at once; (code, details, seconds) each."""
    results: list = [None] * len(timeouts)
    start = threading.Barrier(len(timeouts))

    def call(index: int) -> None:
        with ExplainClient(target) as client:
            grpc.channel_ready_future(client.channel).result(timeout=30)  # connected before the race starts
            start.wait()
            began = time.monotonic()
            try:
                client.explain(MAX_IMAGE, model=MODEL, methods=list(methods), timeout=timeouts[index])
                results[index] = (grpc.StatusCode.OK, "", time.monotonic() - began)
            except ExplainError as error:
                results[index] = (error.code, error.details, time.monotonic() - began)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(timeouts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return results


def test_calls_beyond_the_slot_and_queue_are_refused_at_once(one_slot_gateway):
    target, metrics_url = one_slot_gateway
    before = metrics_text(metrics_url)
    results = concurrent_calls(target, [120.0] * 4)
    codes = sorted(code.name for code, _, _ in results)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], results
    served = [seconds for code, _, seconds in results if code == grpc.StatusCode.OK]
    refused = [(details, seconds) for code, details, seconds in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("overloaded: 1 calls at work and 1 waiting" in details for details, _ in refused), refused
    # refused at once: long before the call at work ends (the queued one waits for it, so takes longer still)
    assert max(seconds for _, seconds in refused) < min(served) / 2, results
    after = metrics_text(metrics_url)
    increase = (metric_value(after, "explainserve_refused_requests_total", rpc="Explain", reason="overloaded")
                - metric_value(before, "explainserve_refused_requests_total", rpc="Explain", reason="overloaded"))
    assert increase == 2
    served_calls = (metric_value(after, "explainserve_requests_total", rpc="Explain")
                    - metric_value(before, "explainserve_requests_total", rpc="Explain"))
    assert served_calls == 2  # refused calls never reached the servicer


def test_a_call_whose_deadline_passes_in_the_queue_never_starts(one_slot_gateway):
    target, metrics_url = one_slot_gateway
    before = metrics_text(metrics_url)
    results = []

    def slow_call():  # every method: the slot stays taken well past the late call's deadline
        results.extend(concurrent_calls(target, [120.0], methods=("swag_i", "swag_g", "swag_i_g", "jitter_cam", "grad_cam")))

    first = threading.Thread(target=slow_call)
    first.start()
    wait_for(lambda: metric_value(metrics_text(metrics_url), "explainserve_inflight_requests", rpc="Explain") == 1,
             timeout=30, interval=0.05)
    with ExplainClient(target) as client:
        with pytest.raises(ExplainError) as late:
            client.explain(MAX_IMAGE, model=MODEL, methods=["grad_cam"], timeout=0.25)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert health(target) == health_pb2.HealthCheckResponse.SERVING  # health is never queued
    first.join(timeout=180)
    assert results[0][0] == grpc.StatusCode.OK, results
    after = metrics_text(metrics_url)
    assert (metric_value(after, "explainserve_refused_requests_total", rpc="Explain", reason="deadline")
            - metric_value(before, "explainserve_refused_requests_total", rpc="Explain", reason="deadline")) == 1
    assert (metric_value(after, "explainserve_requests_total", rpc="Explain")
            - metric_value(before, "explainserve_requests_total", rpc="Explain")) == 1


def test_connections_are_closed_after_their_maximum_age(one_slot_gateway):
    """--max-connection-age 1: an idle client connection is closed by the server (GOAWAY) within
    about a second (plus grpc's 10 % jitter), so the client reconnects and a load balancer can
    send it elsewhere; the next call simply reconnects."""
    target, _ = one_slot_gateway
    states = []
    with grpc.insecure_channel(target) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        wait_for(lambda: grpc.ChannelConnectivity.READY in states, timeout=30, interval=0.05)
        ready_at = time.monotonic()
        wait_for(lambda: states[-1] != grpc.ChannelConnectivity.READY, timeout=10, interval=0.05)
        assert time.monotonic() - ready_at < 5, states
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

