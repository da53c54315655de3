"""Background client load that records every call, and handles on the serving processes that
the fault-injection tests kill, stall or restart."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import grpc
import psutil

from explainserve.client import ExplainClient, ExplainError, ExplainResult
from explainserve.sidecar.local import launch_gateway, wait_serving
from support.serving_harness import Stack

BATCH_SIZE = 4
MAX_BATCH_DELAY_MS = 50
MODEL = "tiny_image"


@dataclass
class Call:
    """One finished call of the background load."""

    client: int
    sequence: int
    started: float  # time.monotonic()
    seconds: float
    code: grpc.StatusCode
    result: object = None  # whatever the call function returned when it succeeded
    details: str = ""


@dataclass
class BackgroundLoad:
    """``clients`` threads, each calling ``call(client, sequence)`` back to back until stopped.

    ``call`` returns a result or raises :class:`ExplainError` / ``grpc.RpcError``; every call is
    recorded as a :class:`Call`.
    """

    call: object
    clients: int
    pause_after_failure: float = 0.05  # seconds; a failing client backs off instead of spinning
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(self.clients)]

    def _loop(self, client: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                record = Call(client, sequence, started, 0.0, grpc.StatusCode.OK, result=self.call(client, sequence))
            except ExplainError as error:
                record = Call(client, sequence, started, 0.0, error.code, details=error.details)
            except grpc.RpcError as error:
                record = Call(client, sequence, started, 0.0, error.code(), details=error.details() or "")
            record.seconds = time.monotonic() - started
            with self._lock:
                self.calls.append(record)
            sequence += 1
            if record.code != grpc.StatusCode.OK:
                self._stop.wait(self.pause_after_failure)

    def __enter__(self) -> "BackgroundLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        if any(thread.is_alive() for thread in self._threads):
            raise AssertionError("a client call hung")

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def wait_for_calls(self, count: int, timeout: float, since: float = 0.0, code=grpc.StatusCode.OK) -> None:
        """Block until ``count`` calls started after ``since`` have ended with ``code``."""
        deadline = time.monotonic() + timeout
        while sum(c.code == code and c.started >= since for c in self.snapshot()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} {code.name} calls after {timeout} s")
            time.sleep(0.05)


def explain_call(target: str, images, methods=(), targets=None, timeout: float = 60.0):
    """A BackgroundLoad call function: client ``i`` explains ``images[i]`` (own channel per client)."""
    clients: dict[int, ExplainClient] = {}

    def call(client: int, _sequence: int) -> ExplainResult:
        if client not in clients:
            clients[client] = ExplainClient(target)
        target_class = None if targets is None else targets[client]
        return clients[client].explain(images[client], model=MODEL, methods=list(methods), timeout=timeout,
                                       target_class=target_class)

    return call


def worker_processes(stack: Stack) -> list[psutil.Process]:
    """TorchServe's live Python model workers (children of the frontend the harness started)."""
    workers = []
    for child in psutil.Process(stack.torchserve.process.pid).children(recursive=True):
        try:
            if any("model_service_worker" in part for part in child.cmdline()):
                workers.append(child)
        except psutil.Error:  # exited, or a killed worker not reaped yet
            continue
    return workers


def restart_gateway(stack: Stack, poll_interval: float = 0.5) -> float:
    """Start a new gateway on the old ports; returns the monotonic time it was started."""
    listen, metrics_port = stack.target, urlparse(stack.metrics_url).port
    started = time.monotonic()
    stack.gateway = launch_gateway(listen, stack.torchserve.grpc_target, stack.torchserve.management_target,
                                   metrics_port, stack.workdir / "gateway.log", ("--poll-interval", str(poll_interval)))
    return started


def ensure_serving(stack: Stack, timeout: float = 60.0) -> None:
    """Wait until the gateway answers SERVING (restarting it if a test left it dead)."""
    if stack.gateway.poll() is not None:
        restart_gateway(stack)
    wait_serving(stack.target, timeout=timeout, process=stack.gateway)

