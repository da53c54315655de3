"""Faults inside TorchServe, under client load through the gateway.

- The model worker stalls (SIGSTOP, as in a long GC pause or CPU starvation) past the
  clients' deadline: every call ends with DEADLINE_EXCEEDED at its deadline plus a small
  margin, and once the worker runs again (SIGCONT) the following calls succeed.
- The model worker process is killed (SIGKILL): TorchServe starts a new one; calls in flight
  may fail with UNAVAILABLE or INTERNAL (counted and printed; "Worker died" is UNAVAILABLE),
  none hangs, the calls after the new worker is READY succeed, and every answer equals the
  library's for its own image.

In both, the gateway's explainserve_requests_total counts each of the client's calls under its
code, and its in-flight gauge is back at zero once the clients stop.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from explainserve.sidecar.service import WORKER_DIED
from support.fault_load import BackgroundLoad, explain_call, worker_processes
from support.serving_harness import explainer_for, random_image, wait_for
from test_serving_e2e import assert_maps_match_library
from test_sidecar_anomaly import metric_value, metrics_text

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
OK = grpc.StatusCode.OK
CLIENTS = 4
DEADLINE_S = 1.5
MARGIN_S = 0.5  # DEADLINE_EXCEEDED must arrive by the deadline plus this
IN_FLIGHT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}  # never RESOURCE_EXHAUSTED (oversize)
# A client's DEADLINE_EXCEEDED is CANCELLED on the gateway when the client gives up first, or
# DEADLINE_EXCEEDED when the deadline it forwarded to TorchServe ends first: one bucket.
BUCKET = {"CANCELLED": "DEADLINE_EXCEEDED"}


def explain_counts(stack) -> dict[str, float]:
    """The gateway's explainserve_requests_total for Explain per code, and its in-flight gauge."""
    text = metrics_text(stack.metrics_url)
    counts = {code.name: metric_value(text, "explainserve_requests_total", rpc="Explain", code=code.name)
              for code in grpc.StatusCode}
    counts["inflight"] = metric_value(text, "explainserve_inflight_requests", rpc="Explain")
    return counts


def assert_gateway_counted_every_call(stack, before: dict[str, float], calls) -> None:
    """Nothing lost: the gateway counted each of the client's calls under its code, and nothing
    is left in flight once the clients stopped (the gauge the autoscaler follows)."""
    expected = {}
    for call in calls:
        code = BUCKET.get(call.code.name, call.code.name)
        expected[code] = expected.get(code, 0) + 1

    def counted() -> tuple[dict, float]:
        after = explain_counts(stack)
        by_code = {}
        for code in after.keys() - {"inflight"}:
            if after[code] != before[code]:
                by_code[BUCKET.get(code, code)] = by_code.get(BUCKET.get(code, code), 0) + after[code] - before[code]
        return by_code, after["inflight"]

    # A cancelled call ends on the gateway a moment after the client gave up.
    try:
        wait_for(lambda: counted() == (expected, 0), timeout=15)
    except TimeoutError:
        raise AssertionError(f"client counted {expected}; gateway (counts, in flight) {counted()}") from None


def test_stalled_worker_gives_deadline_exceeded_then_recovers(fault_stack):
    images = [random_image(200 + i) for i in range(CLIENTS)]
    (worker,) = worker_processes(fault_stack)
    before = explain_counts(fault_stack)
    load = BackgroundLoad(explain_call(fault_stack.target, images, ["grad_cam"], timeout=DEADLINE_S), CLIENTS)
    with load:
        load.wait_for_calls(2 * CLIENTS, timeout=60)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            stalled_at = time.monotonic()
            load.wait_for_calls(2 * CLIENTS, timeout=30, since=stalled_at, code=grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        # Once the worker runs again, calls are answered again.
        load.wait_for_calls(2 * CLIENTS, timeout=60, since=resumed_at)

    stalled = [c for c in load.calls if c.started >= stalled_at + 0.1 and c.started + c.seconds <= resumed_at]
    assert stalled and all(c.code == grpc.StatusCode.DEADLINE_EXCEEDED for c in stalled), {c.code for c in stalled}
    late = max(c.seconds for c in stalled) - DEADLINE_S
    print(f"stalled worker: {len(stalled)} DEADLINE_EXCEEDED calls, at most {late:.2f} s past the {DEADLINE_S} s deadline")
    assert all(DEADLINE_S - 0.05 <= c.seconds <= DEADLINE_S + MARGIN_S for c in stalled), sorted(c.seconds for c in stalled)
    codes = {c.code for c in load.calls}
    assert codes <= {OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert_gateway_counted_every_call(fault_stack, before, load.calls)


def test_killed_worker_is_replaced_and_following_calls_succeed(fault_stack, fault_model):
    images = [random_image(300 + i) for i in range(CLIENTS)]
    expected = explainer_for(*fault_model).explain(images, ["grad_cam"])
    (worker,) = worker_processes(fault_stack)
    before = explain_counts(fault_stack)
    load = BackgroundLoad(explain_call(fault_stack.target, images, ["grad_cam"], timeout=60), CLIENTS)
    with load:
        load.wait_for_calls(2 * CLIENTS, timeout=60)
        killed_at = time.monotonic()
        worker.kill()
        replacement = wait_for(lambda: [p for p in worker_processes(fault_stack) if p.pid != worker.pid], timeout=120)
        fault_stack.torchserve.wait_ready(timeout=120)
        ready_at = time.monotonic()
        load.wait_for_calls(3 * CLIENTS, timeout=60, since=ready_at)

    failed = [c for c in load.calls if c.code != OK]
    print(f"killed worker: replaced by pid {replacement[0].pid} after {ready_at - killed_at:.1f} s; "
          f"{len(failed)} of {len(load.calls)} calls failed: {sorted({(c.code.name, c.details) for c in failed})}")
    assert {c.code for c in failed} <= IN_FLIGHT_CODES, {c.code for c in failed}
    assert all(c.seconds < 60 for c in load.calls), "a call ran into its deadline"
    assert not [c for c in failed if c.started >= ready_at], "a call failed after the new worker was ready"
    # Only calls still open when the worker died, or sent before its replacement was ready, fail.
    assert all(c.started + c.seconds >= killed_at and c.started < ready_at for c in failed), \
        sorted((c.started - killed_at, c.seconds) for c in failed)
    # TorchServe fails a dead worker's batch with RESOURCE_EXHAUSTED "Worker died": a retryable
    # outage, so UNAVAILABLE, never the oversize request RESOURCE_EXHAUSTED means.
    died = [c for c in failed if WORKER_DIED in c.details]
    assert died and all(c.code == grpc.StatusCode.UNAVAILABLE for c in died), [(c.code, c.details) for c in failed]
    # Every answer, before the kill and from the new worker, is the library's for its own image.
    answered = [c for c in load.calls if c.code == OK]
    assert [c for c in answered if c.started >= ready_at]
    for call in answered:
        assert call.result.predicted_class == expected[call.client].predicted
        assert_maps_match_library(call.result, expected[call.client], ["grad_cam"])
    assert_gateway_counted_every_call(fault_stack, before, load.calls)
