"""The gateway's Prometheus metrics (names and labels per docs/CONTRACTS.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds; SLO p95 <= 2.5


def method_label(methods) -> str:
    """The `method` label: requested methods sorted and joined by '+', or 'predict'."""
    return "+".join(sorted(methods)) or "predict"


class GatewayMetrics:
    """All metrics of one gateway, in their own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("explainserve_requests", "Requests answered, by RPC, method and gRPC status code.",
                                ["rpc", "method", "code"], registry=r)
        self.duration = Histogram("explainserve_request_duration_seconds", "End-to-end latency in the gateway.",
                                  ["rpc", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.torchserve_duration = Histogram("explainserve_torchserve_duration_seconds",
                                             "Round trip of the forwarded Predictions call to TorchServe.",
                                             ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("explainserve_inflight_requests", "Requests being handled now.", ["rpc"], registry=r)
        self.torchserve_up = Gauge("explainserve_torchserve_up", "1 when TorchServe answers its ping.", registry=r)
        self.workers = Gauge("explainserve_torchserve_workers", "TorchServe workers per model and status.",
                             ["model", "status"], registry=r)
        self.model_build = Gauge("explainserve_model_build_timestamp_seconds",
                                 "When the served model archive was built (seconds since the epoch).", ["model"], registry=r)
        self.verdicts = Counter("explainserve_anomaly_verdicts", "Anomaly verdicts returned.",
                                ["model", "verdict"], registry=r)
        self.anomaly_unavailable = Counter("explainserve_anomaly_unavailable",
                                           "Requests that could not be scored for anomalies, by reason.",
                                           ["model", "reason"], registry=r)
