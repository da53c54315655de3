"""Graceful drain: SIGTERM during an in-flight Explain on a real gateway in front of the shared
fault TorchServe. The calls in flight are answered, new calls and health checks are refused, and
the process exits within --drain-seconds (cutting calls that would take longer)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from explainserve.client import ExplainClient, ExplainError
from support.fault_load import MODEL
from support.serving_harness import health, png, start_gateway, stop_gateway, wait_for
from test_sidecar_anomaly import metric_value, metrics_text

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
# A maximum-size image (49 kB that decode to 48 MiB) with three maps: seconds of decoding and
# resizing in the handler here.
SLOW_IMAGE = png(np.zeros((4096, 4096, 3), np.uint8))
SLOW_METHODS = ["swag_i", "grad_cam", "jitter_cam"]
# Calls held in flight across the SIGTERM. They share one TorchServe batch and end together, so
# the window in which a late call must be refused is this many slow calls long (one call alone
# answered 1.1 s after SIGTERM on a loaded machine, sooner than the late call was made).
HELD_CALLS = 3


def in_flight_call(target: str) -> tuple[threading.Thread, dict]:
    """Start a slow Explain in a thread; the dict gets its result or error and when it ended."""
    outcome: dict = {}

    def call():
        with ExplainClient(target) as client:
            try:
                outcome["result"] = client.explain(SLOW_IMAGE, model=MODEL, methods=SLOW_METHODS, timeout=120)
            except ExplainError as error:
                outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


def started_gateway(fault_stack, workdir, drain_seconds: float):
    torchserve = fault_stack.torchserve
    process, target, metrics_url = start_gateway(workdir, torchserve.grpc_target, torchserve.management_target,
                                                 token_file=torchserve.key_file,
                                                 extra_args=("--drain-seconds", str(drain_seconds)))
    wait_for(lambda: health(target) == health_pb2.HealthCheckResponse.SERVING, timeout=60)
    return process, target, metrics_url


def wait_in_flight(metrics_url: str, calls: int = 1) -> None:
    wait_for(lambda: metric_value(metrics_text(metrics_url), "explainserve_inflight_requests", rpc="Explain") == calls,
             timeout=30, interval=0.02)


def test_sigterm_finishes_the_calls_in_flight_refuses_new_ones_and_exits(fault_stack, tmp_path):
    process, target, metrics_url = started_gateway(fault_stack, tmp_path, drain_seconds=60)
    try:
        held = [in_flight_call(target) for _ in range(HELD_CALLS)]
        wait_in_flight(metrics_url, HELD_CALLS)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in (tmp_path / "gateway.log").read_text(), timeout=10, interval=0.01)
        with ExplainClient(target) as late:
            with pytest.raises(ExplainError) as refused:
                late.explain(SLOW_IMAGE, model=MODEL, timeout=10)
        refused_at = time.monotonic()
        # Refused by the draining gateway itself, not cancelled by the server's shutdown.
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "shutting down" in str(refused.value), refused.value
        assert health(target) != health_pb2.HealthCheckResponse.SERVING
        for thread, _ in held:
            thread.join(timeout=120)
        exit_code = process.wait(timeout=60)
        exited = time.monotonic()
    finally:
        stop_gateway(process)
    outcomes = [outcome for _, outcome in held]
    for outcome in outcomes:
        assert "result" in outcome, outcome.get("error")
        assert len(outcome["result"].classes) == 5 and set(outcome["result"].maps) == set(SLOW_METHODS)
    last_ended = max(outcome["ended"] for outcome in outcomes)
    assert last_ended > refused_at  # the new call was refused while the old ones were still at work
    assert exit_code == 0 and exited - last_ended < 5
    print(f"drain: SIGTERM at 0 s, a new call refused at {refused_at - signalled:.2f} s, the {HELD_CALLS} calls in "
          f"flight answered by {last_ended - signalled:.2f} s, exit at {exited - signalled:.2f} s")


def test_drain_is_bounded_by_drain_seconds(fault_stack, tmp_path):
    process, target, metrics_url = started_gateway(fault_stack, tmp_path, drain_seconds=0.2)
    try:
        thread, outcome = in_flight_call(target)
        wait_in_flight(metrics_url)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)
        exited = time.monotonic()
        thread.join(timeout=120)
    finally:
        stop_gateway(process)
    assert exit_code == 0 and exited - signalled < 5
    assert outcome["error"].code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome["error"]
