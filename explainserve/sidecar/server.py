"""Assemble and run the gateway: Explain API, health, reflection, metrics, TorchServe poll."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from explainserve._generated import explain_pb2, explain_pb2_grpc, grpc_predict_v2_pb2_grpc
from explainserve.wire import MAX_MESSAGE_BYTES

from .admission import Admission, AdmissionInterceptor
from .auth import AuthInterceptor, KeyRing
from .scoring import AnomalyScoring
from .catalog import ModelCatalog
from .keys import KeyFile, KeyInterceptor
from .metrics import GatewayMetrics
from .oip import InferenceService
from .service import ExplainerService
from .tls import ServerCertificates

log = logging.getLogger(__name__)
SERVICE_NAME = explain_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name
# Health service name of anomaly scoring: SERVING when every store of --store-dir is in use.
ANOMALY_HEALTH = "anomaly"
# Health service name that is SERVING while the event loop answers (a liveness probe), whatever TorchServe does.
LIVENESS_HEALTH = "liveness"
# Both hops (client -> gateway, gateway -> TorchServe) carry whole maps and clips.
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Server pings find dead client connections; clients may ping every 10 s (grpc's default minimum is 5 min,
# and a client that pings more often is disconnected with "too_many_pings").
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def server_options(config: "GatewayConfig") -> list[tuple[str, int]]:
    """The public server's channel options: message sizes, keepalive, and a maximum connection age
    (with grpc's own +-10 % jitter) after which a client reconnects, so new pods get traffic; calls
    in flight on an aged connection get ``default_timeout`` seconds to finish."""
    return MESSAGE_OPTIONS + KEEPALIVE_OPTIONS + [
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.default_timeout * 1000)),
    ]


@dataclass
class GatewayConfig:
    listen: str = "127.0.0.1:50051"
    torchserve_inference: str = "127.0.0.1:7070"
    torchserve_management: str = "127.0.0.1:7071"
    metrics_port: int = 9464
    metrics_address: str = "127.0.0.1"
    poll_interval: float = 2.0
    default_timeout: float = 120.0
    # Distribution stores, one folder per model name (--store-dir); None: no anomaly verdicts.
    store_dir: str | None = None
    # Seconds between checks of --store-dir for changed stores (0: only on SIGHUP).
    store_poll_interval: float = 5.0
    metrics_per_class: bool = False  # `class` label on the anomaly counters
    # TorchServe's key_file.json; None when TorchServe runs without token authorisation.
    token_file: str | None = None
    # Surprise regions for ANOMALOUS verdicts when a request leaves explain_anomaly unset.
    explain_anomaly: bool = False
    # Admission control (sidecar.admission): calls at work at once, and calls waiting beyond them.
    # A call costs the gateway about 4x its message size while it is forwarded (its own copy, the
    # serialised forward, gRPC's buffers) and 1x while it waits: 4 + 4 calls of 48 MiB stay under 1 GiB.
    max_concurrent_requests: int = 4
    max_queued_requests: int = 4
    # Seconds after which a client connection is closed (gracefully), so clients rebalance.
    max_connection_age: float = 300.0
    # TLS on the public port (sidecar.tls): certificate and key, and a CA for client certificates (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Bearer API keys (sidecar.auth); None: any caller that reaches the port is served.
    auth_keys: str | None = None
    # gRPC server reflection (lists the services and their messages to anyone who asks).
    reflection: bool = False
    # Seconds in-flight calls get to finish after SIGTERM (then they are cancelled and the gateway exits).
    drain_seconds: float = 30.0
    # A plaintext host:port serving only grpc.health.v1 (kubelet gRPC probes cannot speak TLS); None: none.
    health_listen: str | None = None


class Gateway:
    """One running gateway; ``await start()``, later ``await stop(grace)``."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = GatewayMetrics(per_class=config.metrics_per_class)
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None  # --health-listen
        self._tasks: list[asyncio.Task] = []
        self._metrics_server = None
        self.anomaly: AnomalyScoring | None = None
        self.admission: Admission | None = None
        # Set by start(); stop() closes whatever start() got to (a signal may come before it ran).
        self._health: health.aio.HealthServicer | None = None
        self._inference: grpc.aio.Channel | None = None
        self._management: grpc.aio.Channel | None = None

    async def start(self) -> int:
        """Start serving; returns the bound gRPC port."""
        config = self.config
        key_file = KeyFile(config.token_file) if config.token_file else None

        def channel(target: str, kind: str) -> grpc.aio.Channel:
            interceptors = [KeyInterceptor(key_file, kind)] if key_file else None
            return grpc.aio.insecure_channel(target, options=MESSAGE_OPTIONS, interceptors=interceptors)

        self._inference = channel(config.torchserve_inference, "inference")
        self._management = channel(config.torchserve_management, "management")
        catalog = ModelCatalog(self._inference, self._management, self.metrics, poll_interval=config.poll_interval)
        anomaly = self.anomaly = AnomalyScoring(self.metrics, config.store_dir)
        await asyncio.to_thread(anomaly.load)  # verifies every array's sha256
        catalog.on_model(anomaly.model_served)
        service = ExplainerService(self._inference, catalog, self.metrics, anomaly,
                                   default_timeout=config.default_timeout, explain_anomaly=config.explain_anomaly)
        health_servicer = self._health = health.aio.HealthServicer()

        async def report(up: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)

        catalog.on_health_change(lambda up: self._tasks.append(asyncio.ensure_future(report(up))))
        await report(False)  # SERVING only once TorchServe answers its ping

        async def report_anomaly(healthy: bool) -> None:
            await health_servicer.set(ANOMALY_HEALTH, health_pb2.HealthCheckResponse.SERVING if healthy
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)

        anomaly.on_health_change(lambda healthy: self._tasks.append(asyncio.ensure_future(report_anomaly(healthy))))
        await report_anomaly(anomaly.healthy)
        await health_servicer.set(LIVENESS_HEALTH, health_pb2.HealthCheckResponse.SERVING)

        self.admission = admission = Admission(config.max_concurrent_requests, config.max_queued_requests)
        self.metrics.queued.set_function(lambda: admission.queued)
        # First refuse callers without a key, then queue: a stranger never holds a turn.
        interceptors = [AuthInterceptor(KeyRing(config.auth_keys), self.metrics.refused)] if config.auth_keys else []
        interceptors.append(AdmissionInterceptor(admission, self.metrics.refused))
        self.server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
        explain_pb2_grpc.add_ExplainerServicer_to_server(service, self.server)
        # The Open Inference Protocol on the same port, over the same Explain path.
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(service), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        if config.reflection:
            reflection.enable_server_reflection(
                # Not the Open Inference Protocol: its messages live in a pool of their own (gen_protos.py).
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        if config.tls_cert:
            certificates = ServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca)
            port = self.server.add_secure_port(config.listen, certificates.credentials())
        else:
            port = self.server.add_insecure_port(config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
        await self.server.start()
        if config.health_listen:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.health_server)
            if self.health_server.add_insecure_port(config.health_listen) == 0:
                raise OSError(f"cannot listen on {config.health_listen}")
            await self.health_server.start()
        self._metrics_server, _ = start_http_server(config.metrics_port, config.metrics_address,
                                                    registry=self.metrics.registry)
        self._tasks.append(asyncio.ensure_future(catalog.poll_forever()))
        if config.store_dir is not None:  # reload stores that change (and on SIGHUP: reload_stores)
            self._tasks.append(asyncio.ensure_future(anomaly.watch(config.store_poll_interval or None)))
        log.info("gateway on %s -> TorchServe %s; metrics on :%d", config.listen, config.torchserve_inference,
                 config.metrics_port)
        return port

    def reload_stores(self) -> None:
        """Verify every store of --store-dir again now, changed or not (SIGHUP)."""
        if self.anomaly is not None:
            self.anomaly.wake()

    async def stop(self, grace: float = 2.0) -> None:
        """Drain: every health status NOT_SERVING, refuse new calls, let calls in flight finish for
        up to ``grace`` seconds (then cancel them), then close everything."""
        deadline = time.monotonic() + grace
        if self.admission is not None:
            self.admission.drain()
        log.info("draining: health NOT_SERVING, new calls refused, %d call(s) in flight get up to %g s",
                 self.inflight(), grace)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.admission is not None:
            # The server's own stop refuses late calls with CANCELLED when they race its start;
            # while the calls in flight finish, admission refuses them with UNAVAILABLE instead.
            await self.admission.wait_idle(max(deadline - time.monotonic(), 0.0))
        if self.server is not None:
            await self.server.stop(max(deadline - time.monotonic(), 0.0))
        if self.health_server is not None:
            await self.health_server.stop(0)
        for task in self._tasks:
            task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for channel in (self._inference, self._management):
            if channel is not None:
                await channel.close()
        log.info("stopped")

    def inflight(self) -> int:
        """API calls being handled now."""
        return int(sum(sample.value for metric in self.metrics.inflight.collect() for sample in metric.samples))


def run(config: GatewayConfig) -> None:
    """Run a gateway until SIGTERM or SIGINT, then drain for ``config.drain_seconds``; SIGHUP
    reloads the distribution stores."""
    import signal

    async def main():
        gateway = Gateway(config)
        await gateway.start()
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_stores)
        await stopping.wait()
        await gateway.stop(config.drain_seconds)

    asyncio.run(main())
