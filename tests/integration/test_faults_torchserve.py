"""Faults inside TorchServe, under client load through the gateway.

- The model worker stalls (SIGSTOP, as in a long GC pause or CPU starvation) past the
  clients' deadline: every call ends with DEADLINE_EXCEEDED at its deadline plus a small
  margin, and once the worker runs again (SIGCONT) the following calls succeed.
- The model worker process is killed (SIGKILL): TorchServe starts a new one; calls in flight
  may fail with UNAVAILABLE or INTERNAL (counted and printed), none hangs, and the calls after
  the new worker is READY succeed.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from support.fault_load import BackgroundLoad, explain_call, worker_processes
from support.serving_harness import random_image, wait_for

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
OK = grpc.StatusCode.OK
CLIENTS = 4
DEADLINE_S = 1.5
MARGIN_S = 0.5  # DEADLINE_EXCEEDED must arrive by the deadline plus this
IN_FLIGHT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}  # never RESOURCE_EXHAUSTED (oversize)


def test_stalled_worker_gives_deadline_exceeded_then_recovers(fault_stack):
    images = [random_image(200 + i) for i in range(CLIENTS)]
    (worker,) = worker_processes(fault_stack)
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


def test_killed_worker_is_replaced_and_following_calls_succeed(fault_stack):
    images = [random_image(300 + i) for i in range(CLIENTS)]
    (worker,) = worker_processes(fault_stack)
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
