"""A gateway process (``explainserve sidecar``) on free loopback ports, alone or in front of a
TorchServe it starts, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explainserve.sidecar.torchserve import TorchServe, TorchServeConfig, free_port, log_tail


class GatewayProcess(subprocess.Popen):
    """A gateway process and ``log_path``, the file its output is appended to."""

    def __init__(self, command: list[str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            super().__init__(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def launch_gateway(listen: str, torchserve_inference: str, torchserve_management: str, metrics_port: int,
                   log_path: Path, extra_args: tuple[str, ...] = ()) -> GatewayProcess:
    """Start ``explainserve sidecar`` on ``listen`` and ``metrics_port``, in front of the given
    TorchServe targets, as its own process group appending its output to ``log_path``."""
    return GatewayProcess([sys.executable, "-m", "explainserve.cli", "sidecar", "--listen", listen,
                           "--torchserve", torchserve_inference, "--torchserve-management", torchserve_management,
                           "--metrics-port", str(metrics_port), *extra_args], log_path)


def start_gateway(workdir: Path, torchserve_inference: str, torchserve_management: str,
                  poll_interval: float = 0.5, token_file: Path | None = None, extra_args: tuple[str, ...] = (),
                  log_name: str = "gateway.log") -> tuple[GatewayProcess, str, str]:
    """:func:`launch_gateway` on free loopback ports, logging to ``workdir/log_name``; returns
    (process, gRPC target, metrics URL).

    The targets need not answer: Score / ScoreBatch for a model with a store in
    ``--store-dir`` (in ``extra_args``) work without TorchServe.
    """
    port, metrics_port = free_port(), free_port()
    process = launch_gateway(f"127.0.0.1:{port}", torchserve_inference, torchserve_management, metrics_port,
                             workdir / log_name, ("--poll-interval", str(poll_interval),
                                                  *(["--token-file", str(token_file)] if token_file else []),
                                                  *extra_args))
    return process, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"


def stop_gateway(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the gateway, SIGKILL it if it has not exited after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def health(target: str, service: str = ""):
    """The gateway's health status for ``service`` ("" server-wide), None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=2).status
        except grpc.RpcError:
            return None


def wait_serving(target: str, timeout: float, process: subprocess.Popen | None = None, service: str = "") -> None:
    """Block until the gateway's health check for ``service`` ("" server-wide, which follows
    TorchServe; "anomaly": every distribution store loaded) answers SERVING. When ``process``
    exits first, the error quotes the end of its log (a :class:`GatewayProcess`'s)."""
    log = process.log_path if isinstance(process, GatewayProcess) else None
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                quoted = f"; the end of {log}:\n{log_tail(log)}" if log is not None else ""
                raise RuntimeError(f"the gateway exited with code {process.returncode}{quoted}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway at {target} is not SERVING after {timeout} s")
            time.sleep(0.3)


@contextlib.contextmanager
def local_service(model_store: Path, models: Sequence[str], workdir: Path, *, ready_timeout: float = 300.0,
                  env: dict[str, str] | None = None,
                  gateway_args: tuple[str, ...] = ()) -> Iterator[tuple[TorchServe, subprocess.Popen, str]]:
    """TorchServe serving ``<name>.mar`` of ``model_store`` for each name in ``models`` (token
    authorisation off, free loopback ports, working files in ``workdir``) and a gateway in
    front of it, started with ``gateway_args`` as well; yields (torchserve, gateway process, gateway target) once both serve, and
    always stops both."""
    torchserve = TorchServe(TorchServeConfig(
        model_store=model_store, models={name: f"{name}.mar" for name in models}, workdir=workdir / "ts",
        grpc_inference_port=0, grpc_management_port=0, disable_token_auth=True, env=env or {})).start()
    gateway = None
    try:
        torchserve.wait_ready(timeout=ready_timeout)
        gateway, target, _ = start_gateway(workdir, torchserve.grpc_target, torchserve.management_target,
                                          extra_args=gateway_args)
        wait_serving(target, timeout=60, process=gateway)
        yield torchserve, gateway, target
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        torchserve.stop()
