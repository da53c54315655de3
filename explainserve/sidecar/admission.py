"""Admission control of the public API: a bounded number of calls at work, a short bounded queue.

At most ``max_concurrent`` calls of the API services run at once; up to ``max_queued`` more
wait, first come first served. A call that finds the queue full is refused at once with
RESOURCE_EXHAUSTED, so a client retries elsewhere (another pod) instead of piling up memory
here. A call whose deadline passes while it waits, or has passed when its turn comes, is
answered DEADLINE_EXCEEDED before any work starts (decode, forward); one whose client cancels
while it waits is dropped by gRPC. Every refusal is counted in
``explainserve_refused_requests_total{rpc, reason}``.

Health checks and reflection are never queued or refused: a probe must see the server even when
it is saturated.
"""

from __future__ import annotations

import asyncio

import grpc

# gRPC services outside admission control (and, in sidecar.auth, outside authentication).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")

OVERLOADED = "overloaded"       # the queue was full
DEADLINE = "deadline"           # the call's deadline passed before its work started


def rpc_name(method: str) -> str:
    """The `rpc` label of a full method name: "/explainserve.v1.Explainer/Explain" -> "Explain"."""
    return method.rsplit("/", 1)[-1]


def is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


class Refused(Exception):
    """A call refused before its work started."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class Admission:
    """Counts calls at work and waiting; :meth:`enter` / :meth:`leave` bracket one call's work.

    Parameters
    ----------
    max_concurrent : int
        Calls at work at once, >= 1.
    max_queued : int
        Calls waiting for a turn, >= 0.
    """

    def __init__(self, max_concurrent: int, max_queued: int):
        if max_concurrent < 1:
            raise ValueError(f"--max-concurrent-requests must be >= 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {max_queued}")
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.active = 0
        self.queued = 0
        self._turns = asyncio.Semaphore(max_concurrent)

    async def enter(self, context) -> None:
        """Wait for a turn; raises :class:`Refused` when the queue is full or the deadline passes."""
        if self._turns.locked() and self.queued >= self.max_queued:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED,
                          f"overloaded: {self.max_concurrent} calls at work and {self.queued} waiting; retry later")
        self.queued += 1
        try:
            await asyncio.wait_for(self._turns.acquire(), context.time_remaining())
        except asyncio.TimeoutError:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE,
                          "the deadline passed while the call waited for a turn") from None
        finally:
            self.queued -= 1
        self.active += 1
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self.leave()
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE, "the deadline passed before the call started")

    def leave(self) -> None:
        self.active -= 1
        self._turns.release()


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Puts every unary call of the API services through an :class:`Admission`.

    Parameters
    ----------
    admission : Admission
    refused : prometheus_client.Counter
        ``explainserve_refused_requests_total``, labels (rpc, reason).
    """

    def __init__(self, admission: Admission, refused):
        self.admission = admission
        self.refused = refused

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or is_open(details.method):
            return handler
        work, rpc, admission = handler.unary_unary, rpc_name(details.method), self.admission

        async def admitted(request, context):
            try:
                await admission.enter(context)
            except Refused as refusal:
                self.refused.labels(rpc, refusal.reason).inc()
                await context.abort(refusal.code, refusal.message)
            try:
                return await work(request, context)
            finally:
                admission.leave()

        return grpc.unary_unary_rpc_method_handler(admitted, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
