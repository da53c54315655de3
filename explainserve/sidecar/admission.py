"""Admission control of the public API: a bounded number of calls at work, a short bounded queue.

At most ``max_concurrent`` calls of the API services run at once; up to ``max_queued`` more
wait, first come first served. A call that finds the queue full is refused at once with
RESOURCE_EXHAUSTED, so a client retries elsewhere (another pod) instead of piling up memory
here. A call whose deadline passes while it waits, or has passed when its turn comes, is
answered DEADLINE_EXCEEDED before any work starts (decode, forward); one whose client cancels
while it waits is dropped by gRPC. Every refusal is counted in
``explainserve_refused_requests_total{rpc, reason}``. Once the gateway drains (SIGTERM), every
new call is refused with UNAVAILABLE (reason ``draining``) while the calls already in are served.

Health checks and reflection are never queued or refused: a probe must see the server even when
it is saturated. A stream (ScoreStream) takes one turn for its whole life.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc

# gRPC services outside admission control (and, in sidecar.auth, outside authentication).
# The Open Inference Protocol's liveness and readiness are probes too.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/", "/inference.GRPCInferenceService/ServerLive",
                 "/inference.GRPCInferenceService/ServerReady")

OVERLOADED = "overloaded"       # the queue was full
DRAINING = "draining"           # the gateway is shutting down (SIGTERM)
DEADLINE = "deadline"           # the call's deadline passed before its work started
# A queued call gives up this many seconds before its deadline: gRPC cancels the call at the
# deadline itself, and when that cancellation wins the race the refusal is neither answered by
# us nor counted.
DEADLINE_MARGIN_S = 0.05


def rpc_name(method: str) -> str:
    """The `rpc` label of a full method name: "/explainserve.v1.Explainer/Explain" -> "Explain"."""
    return method.rsplit("/", 1)[-1]


def is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


async def guarded(continuation, details, guard):
    """The handler of ``details.method`` with its work run inside ``async with guard(rpc, request,
    context) as check``, for the calls of the API services; others are left as they are. A guard
    refuses a call by aborting its context before it yields, and ``await check(message)`` refuses
    one message of a stream the same way.

    A stream (ScoreStream) is guarded as a whole with ``request`` None, and each message it
    carries is checked before the servicer sees it. API methods of another kind (none yet) are
    answered UNIMPLEMENTED rather than served unguarded.
    """
    handler = await continuation(details)
    if handler is None or is_open(details.method):
        return handler
    rpc = rpc_name(details.method)
    if handler.unary_unary is not None:
        work = handler.unary_unary

        async def run(request, context):
            async with guard(rpc, request, context):
                return await work(request, context)

        return grpc.unary_unary_rpc_method_handler(run, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    if handler.stream_stream is not None:
        work = handler.stream_stream

        async def run_stream(requests, context):
            async with guard(rpc, None, context) as check:
                async for response in work(checked(requests, check), context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(run_stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    return None


async def checked(requests, check):
    """``requests`` (an async iterator), each passed to ``await check(request)`` first."""
    async for request in requests:
        await check(request)
        yield request


async def admit_any(_request) -> None:
    """The check of a guard that looks at no message."""


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
        self.draining = False
        self._turns = asyncio.Semaphore(max_concurrent)
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Refuse every call from now on (UNAVAILABLE); calls at work or waiting are kept."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no call is at work or waiting; True if none is."""
        if self._idle.is_set():  # wait_for with no time left times out before even looking
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _count(self, active: int = 0, queued: int = 0) -> None:
        self.active += active
        self.queued += queued
        if self.active or self.queued:
            self._idle.clear()
        else:
            self._idle.set()

    async def enter(self, context) -> None:
        """Wait for a turn; raises :class:`Refused` when draining, when the queue is full or when the
        deadline passes."""
        if self.draining:
            # Refused here rather than left to the server's shutdown, which cancels (CANCELLED) a
            # call that arrives while it begins: UNAVAILABLE tells a client to retry elsewhere.
            raise Refused(grpc.StatusCode.UNAVAILABLE, DRAINING, "the gateway is shutting down; retry on another replica")
        if self._turns.locked() and self.queued >= self.max_queued:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED,
                          f"overloaded: {self.max_concurrent} calls at work and {self.queued} waiting; retry later")
        if self._turns.locked():
            await self._wait_for_turn(context)
        else:
            # A free turn is taken at once (acquire does not yield here), without the task and
            # timer that wait_for sets up: most calls find one, and that setup cost about 80 us
            # per call, a quarter of a unary Score's own work.
            await self._turns.acquire()
        self._count(active=1)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self.leave()
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE, "the deadline passed before the call started")

    async def _wait_for_turn(self, context) -> None:
        """Queue until a turn is free; :class:`Refused` when the deadline passes first."""
        self._count(queued=1)
        try:
            remaining = context.time_remaining()
            wait = None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.0)
            await asyncio.wait_for(self._turns.acquire(), wait)
        except asyncio.TimeoutError:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE,
                          "the deadline passed while the call waited for a turn") from None
        finally:
            self._count(queued=-1)

    def leave(self) -> None:
        self._turns.release()
        self._count(active=-1)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call of the API services inside the async context manager
    ``self.guard(rpc, request, context)`` (see :func:`guarded`), which refuses a call with
    :meth:`refuse` and yields the check of a stream's messages.

    Parameters
    ----------
    refused : prometheus_client.Counter
        ``explainserve_refused_requests_total``, labels (rpc, reason).
    """

    def __init__(self, refused):
        self.refused = refused

    async def intercept_service(self, continuation, details):
        return await guarded(continuation, details, self.guard)

    def guard(self, rpc: str, request, context):
        raise NotImplementedError

    async def refuse(self, context, rpc: str, reason: str, code: grpc.StatusCode, message: str) -> None:
        """Count the refusal and end the call with ``code``."""
        self.refused.labels(rpc, reason).inc()
        await context.abort(code, message)


class AdmissionInterceptor(GuardInterceptor):
    """Puts every call of the API services through an :class:`Admission`."""

    def __init__(self, admission: Admission, refused):
        super().__init__(refused)
        self.admission = admission

    @asynccontextmanager
    async def guard(self, rpc: str, _request, context):
        try:
            await self.admission.enter(context)
        except Refused as refusal:
            await self.refuse(context, rpc, refusal.reason, refusal.code, refusal.message)
        try:
            yield admit_any
        finally:
            self.admission.leave()
