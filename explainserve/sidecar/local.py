"""A gateway process (``explainserve sidecar``) on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explainserve.sidecar.torchserve import free_port


def start_gateway(workdir: Path, torchserve_inference: str, torchserve_management: str,
                  poll_interval: float = 0.5, token_file: Path | None = None, extra_args: tuple[str, ...] = (),
                  log_name: str = "gateway.log") -> tuple[subprocess.Popen, str, str]:
    """Start ``explainserve sidecar`` in front of the given TorchServe targets, as its own
    process group logging to ``workdir/log_name``; returns (process, gRPC target, metrics URL).

    The targets need not answer: Score / ScoreBatch for a model with a store in
    ``--store-dir`` (in ``extra_args``) work without TorchServe.
    """
    port, metrics_port = free_port(), free_port()
    with open(workdir / log_name, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "explainserve.cli", "sidecar", "--listen", f"127.0.0.1:{port}",
             "--torchserve", torchserve_inference, "--torchserve-management", torchserve_management,
             "--metrics-port", str(metrics_port), "--poll-interval", str(poll_interval),
             *(["--token-file", str(token_file)] if token_file else []), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
