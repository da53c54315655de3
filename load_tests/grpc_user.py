"""A locust User that calls the Explain API over gRPC, and the interceptor that reports each call.

gRPC is patched for gevent before any channel exists, so hundreds of users share one process.
Each call is reported to locust's ``request`` event under a name chosen by the task
(``"swag_i_g"``, ``"bad: truncated png"``, ...). A call *fails* for locust when its status code
differs from the one the task expected, so malformed requests refused with their documented
code count as successes. A valid call the gateway sheds because it is at capacity
(RESOURCE_EXHAUSTED "overloaded: ...", ``--max-concurrent-requests``) is expected too: shedding a
burst at once is the documented back-pressure, not a fault; it is tallied as ``SHED``. Status codes and anomaly verdicts are tallied per name and written to
``<csv prefix>_codes.csv`` when locust quits.
"""

from __future__ import annotations

import collections
import csv
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events

from explainserve.client import MAX_MESSAGE_BYTES, MAX_RECONNECT_BACKOFF_MS
from explainserve._generated import explain_pb2, explain_pb2_grpc

grpc_gevent.init_gevent()

# How the gateway's admission control words a refusal at capacity (explainserve.sidecar.admission).
OVERLOADED_PREFIX = "overloaded:"
# Status name tallied for a call shed at capacity.
SHED = "SHED"
# (request name, status code name, anomaly status) -> calls
CODE_COUNTS: collections.Counter = collections.Counter()


class UnexpectedStatus(Exception):
    """A call ended with another status code than the task expected."""

    def __init__(self, code: grpc.StatusCode, expected: grpc.StatusCode, details: str):
        super().__init__(f"{code.name} (expected {expected.name})")
        self.details = details


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary call of one user and fires locust's ``request`` event for it."""

    def __init__(self, user: "GrpcUser"):
        self.user = user

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name, expected = self.user.call_name, self.user.call_expects
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        code = call.code()  # waits for the call to end
        elapsed_ms = (time.perf_counter() - started) * 1000
        response = call.result() if code == grpc.StatusCode.OK else None
        anomaly = ""
        if shed(code, call.details()) and expected == grpc.StatusCode.OK:
            expected, code_name = code, SHED
        else:
            code_name = code.name
        if isinstance(response, explain_pb2.ExplainResponse):
            anomaly = anomaly_outcome(response.anomaly)
        self.user.environment.events.request.fire(
            request_type="grpc", name=name, response_time=elapsed_ms,
            response_length=response.ByteSize() if response is not None else 0, response=response,
            context={"code": code_name, "anomaly": anomaly},
            exception=None if code == expected else UnexpectedStatus(code, expected, call.details() or ""),
        )
        return call


def shed(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether the gateway refused a call at once because it was at capacity."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (details or "").startswith(OVERLOADED_PREFIX)


def anomaly_outcome(report: explain_pb2.AnomalyReport) -> str:
    """``"unavailable"``, ``"normal"`` or ``"anomalous"`` (verdict for the predicted class)."""
    if report.status != explain_pb2.AnomalyReport.OK:
        return "unavailable"
    return explain_pb2.ClassVerdict.Verdict.Name(report.predicted.verdict).lower()


class GrpcUser(User):
    """Base user: one channel per user to ``--host`` (``host:port`` of the gateway)."""

    abstract = True
    timeout = 60.0  # seconds; the per-call deadline

    def on_start(self) -> None:
        self.call_name, self.call_expects = "", grpc.StatusCode.OK
        self.channel = grpc.insecure_channel(self.host, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ])
        self.stub = explain_pb2_grpc.ExplainerStub(grpc.intercept_channel(self.channel, LocustInterceptor(self)))

    def on_stop(self) -> None:
        self.channel.close()

    def explain(self, name: str, request: explain_pb2.ExplainRequest,
                expect: grpc.StatusCode = grpc.StatusCode.OK) -> explain_pb2.ExplainResponse | None:
        """Send one Explain call, reported as ``name``; None when it did not end OK."""
        self.call_name, self.call_expects = name, expect
        try:
            return self.stub.Explain(request, timeout=self.timeout)
        except grpc.RpcError:
            return None  # already reported by the interceptor


@events.request.add_listener
def _tally(name, context, **_kwargs) -> None:
    if context and "code" in context:
        CODE_COUNTS[name, context["code"], context["anomaly"]] += 1


@events.quitting.add_listener
def _write_codes(environment, **_kwargs) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    with open(f"{prefix}_codes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "code", "anomaly", "count"])
        for (name, code, anomaly), count in sorted(CODE_COUNTS.items()):
            writer.writerow([name, code, anomaly, count])
