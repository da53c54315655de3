"""The one place where the gateway scores Grad-AMap filter scores for anomalies.

Until a distribution store is loaded for a model, every answer is UNAVAILABLE with the
reason "no distribution store".
"""

from __future__ import annotations

from explainserve._generated import explain_pb2

NO_STORE = "no distribution store"


class AnomalyScoring:
    """Scores alpha vectors against per-class training distributions, per model."""

    def __init__(self, metrics):
        self.metrics = metrics

    def score(self, model: str, alpha, predicted_class: int, label: int | None = None,
              label_alpha=None) -> explain_pb2.AnomalyReport:
        """An AnomalyReport for one request; never raises for a missing store."""
        self.metrics.verdicts.labels(model, "unavailable").inc()
        self.metrics.anomaly_unavailable.labels(model, NO_STORE).inc()
        return explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.UNAVAILABLE, reason=NO_STORE)
