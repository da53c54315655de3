"""The gateway's Prometheus metrics (names and labels per docs/CONTRACTS.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from explainserve.methods import METHODS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds; SLO p95 <= 2.5
# Scoring one answer takes tens of microseconds to a few milliseconds.
SCORING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1)
# beta = mean_n(alpha_n - mu_cn) scales as (logit - the class's mean logit) / (positions x filters).
# Demo image model (8x8 positions x 128 filters) on FashionScenes: P1..P99 about -4e-4..4e-4 on
# test scenes, extremes -7e-4..7e-4 on ood_backgrounds. A 7x7 x 2048 ResNet-50 sits one to two
# decades lower. Symmetric 1-2-5 steps from 1e-5 to 1e-2 resolve both.
_BETA_STEPS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
BETA_BUCKETS = tuple(-b for b in reversed(_BETA_STEPS)) + (0.0,) + _BETA_STEPS
# Verdict p-values are uniform on in-distribution traffic: every bucket's share is its upper
# bound. Fine steps at the bottom resolve the usual targets (0.1 %, 1 %, 5 %).
P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def method_label(methods) -> str:
    """The `method` label: requested methods sorted and joined by '+', 'predict' for none, and
    'invalid' for unknown or repeated names (which keeps the label set bounded)."""
    methods = list(methods)
    if not set(methods) <= set(METHODS) or len(set(methods)) != len(methods):
        return "invalid"
    return "+".join(sorted(methods)) or "predict"


class GatewayMetrics:
    """All metrics of one gateway, in their own registry."""

    def __init__(self, per_class: bool = False):
        self.per_class = per_class  # adds `class` to the anomaly counters (--metrics-per-class)
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
        self.queued = Gauge("explainserve_queued_requests", "Calls waiting for a turn (--max-queued-requests).",
                            registry=r)
        self.refused = Counter("explainserve_refused_requests", "Calls refused before any work, by RPC and reason: "
                               "overloaded (queue full), deadline, draining (shutting down), unauthenticated, permission_denied.",
                               ["rpc", "reason"], registry=r)
        self.torchserve_up = Gauge("explainserve_torchserve_up", "1 when TorchServe answers its ping.", registry=r)
        self.workers = Gauge("explainserve_torchserve_workers", "TorchServe workers per model and status.",
                             ["model", "status"], registry=r)
        self.model_build = Gauge("explainserve_model_build_timestamp_seconds",
                                 "When the served model archive was built (seconds since the epoch).", ["model"], registry=r)
        by_class = ["class"] if per_class else []
        self.verdicts = Counter("explainserve_anomaly_verdicts", "Anomaly verdicts returned by Explain.",
                                ["model", "verdict", *by_class], registry=r)
        self.surprise_flags = Counter("explainserve_anomaly_surprise_flags",
                                      "Surprising filters (alpha above the class's P99.9) counted over Explain answers.",
                                      ["model", *by_class], registry=r)
        self.expectation_flags = Counter("explainserve_anomaly_expectation_flags",
                                         "Expected-but-missing filters counted over Explain answers.",
                                         ["model", *by_class], registry=r)
        self.beta = Histogram("explainserve_anomaly_beta", "beta (mean filter score minus the class mean) of Explain answers.",
                              ["model"], buckets=BETA_BUCKETS, registry=r)
        self.p_value = Histogram("explainserve_anomaly_p_value",
                                 "Conformal p-value of the anomaly verdicts of Explain answers (uniform in distribution).",
                                 ["model"], buckets=P_VALUE_BUCKETS, registry=r)
        self.test_fired = Counter("explainserve_anomaly_test_fired",
                                  "Explain answers where one test's own p-value was below the target rate, by test.",
                                  ["model", "test"], registry=r)
        self.scoring_duration = Histogram("explainserve_anomaly_scoring_duration_seconds",
                                          "Anomaly scoring time of one Explain answer.", buckets=SCORING_BUCKETS, registry=r)
        self.anomaly_unavailable = Counter("explainserve_anomaly_unavailable",
                                           "Explain answers that could not be scored for anomalies, by reason.",
                                           ["model", "reason", *by_class], registry=r)
        self.store_info = Gauge("explainserve_store_info", "Distribution stores in use (always 1).",
                                ["model", "version", "sha256"], registry=r)
        self.store_build = Gauge("explainserve_store_build_timestamp_seconds",
                                 "When the distribution store in use was built (seconds since the epoch).", ["model"],
                                 registry=r)
        self.store_never_anomalous = Gauge(
            "explainserve_store_classes_never_anomalous",
            "Classes of the store in use whose verdict can never be ANOMALOUS at its target rate (too few "
            "validation images ranked in their group).", ["model"], registry=r)

    def start_scoring(self, model: str, num_classes: int, tests: tuple) -> None:
        """Create the zero-valued verdict, flag, beta and per-test series of a model whose store is
        in use (``tests``: the tests its verdicts can name), so that rates and ratios over them
        (the alert rules) exist before the first ANOMALOUS."""
        for class_id in range(num_classes if self.per_class else 1):
            labels = self.class_labels(class_id)
            for verdict in ("normal", "anomalous"):
                self.verdicts.labels(model, verdict, *labels)
            self.surprise_flags.labels(model, *labels)
            self.expectation_flags.labels(model, *labels)
        self.beta.labels(model)
        self.p_value.labels(model)
        for test in tests:
            self.test_fired.labels(model, test)

    def class_labels(self, class_id: int) -> tuple:
        """The extra label values of the anomaly counters: ``(str(class_id),)`` or ``()``."""
        return (str(class_id),) if self.per_class else ()
