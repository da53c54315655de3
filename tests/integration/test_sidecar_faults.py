"""A TorchServe that is down or too slow gives UNAVAILABLE / DEADLINE_EXCEEDED promptly."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from explainserve.client import ExplainClient, ExplainError
from explainserve.sidecar.torchserve import free_port
from support.serving_harness import (health, random_image, stack_for_module, start_gateway, stop_gateway, tiny_image_model,
                             wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HANDLER_DELAY_S = 4.0


def test_torchserve_down_gives_unavailable_promptly(tmp_path):
    nowhere = f"127.0.0.1:{free_port()}"
    gateway, target, _ = start_gateway(tmp_path, nowhere, nowhere)
    try:
        assert wait_for(lambda: health(target), timeout=60) == health_pb2.HealthCheckResponse.NOT_SERVING
        with ExplainClient(target) as client:
            started = time.monotonic()
            with pytest.raises(ExplainError) as failed:
                client.explain(random_image(0), model="tiny_image", timeout=30)
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
            assert time.monotonic() - started < 10
    finally:
        stop_gateway(gateway)


@pytest.fixture(scope="module")
def slow_stack(request, tmp_path_factory):
    yield from stack_for_module(request, tmp_path_factory.mktemp("slow"), [tiny_image_model()], batch_size=1,
                                max_batch_delay_ms=1, env={"EXPLAINSERVE_TEST_HANDLER_DELAY_S": str(HANDLER_DELAY_S)})


def test_slow_torchserve_gives_deadline_exceeded_at_the_clients_deadline(slow_stack):
    with ExplainClient(slow_stack.target) as client:
        started = time.monotonic()
        with pytest.raises(ExplainError) as failed:
            client.explain(random_image(0), model="tiny_image", timeout=1.0)
        elapsed = time.monotonic() - started
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 2.0
        # A deadline long enough for the handler is met; the earlier call did not wedge the gateway.
        result = client.explain(random_image(1), model="tiny_image", timeout=4 * HANDLER_DELAY_S + 30)
        assert result.timings["handler"] >= HANDLER_DELAY_S


def test_torchserve_stopping_gives_unavailable_and_not_serving(slow_stack):
    slow_stack.torchserve.stop()
    with ExplainClient(slow_stack.target) as client:
        started = time.monotonic()
        with pytest.raises(ExplainError) as failed:
            client.explain(random_image(2), model="tiny_image", timeout=30)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
        assert time.monotonic() - started < 10
    assert wait_for(lambda: health(slow_stack.target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=15)
