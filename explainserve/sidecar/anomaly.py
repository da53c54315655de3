"""The one place where the gateway scores Grad-AMap filter scores for anomalies.

Stores come from ``--store-dir DIR``: one calibrated store per model in ``DIR/<model name>/``
(``explainserve build-distributions --out DIR/<name>``); entries whose name starts with ``.``
(``.shards/``) and plain files are skipped. Every store is loaded and verified (sha256) at
start-up and refused, with a logged reason, when it is corrupt, truncated, uncalibrated, or
names another model than its folder; it is refused later when TorchServe turns out to serve
the model (by default) in another version than the store's manifest names.

A refused or missing store never fails a request: Explain answers carry an UNAVAILABLE
anomaly report with the reason. Health (:attr:`AnomalyScoring.healthy`): SERVING when at least
one store is in use and none was refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explainserve._generated import explain_pb2
from explainserve.anomaly import ANOMALOUS, BatchScores, Scorer, StoreError, load_store

log = logging.getLogger(__name__)

# Values of the `reason` label of explainserve_anomaly_unavailable_total (a bounded set);
# AnomalyReport.reason carries the full text.
NO_STORE = "no distribution store"
STORE_REFUSED = "store refused"          # corrupt, truncated, uncalibrated, unreadable
STORE_MISMATCH = "store mismatch"        # built for another model or version
NO_ALPHA = "no filter scores"            # the handler returned no alpha
SCORING_FAILED = "scoring failed"        # the scorer refused the handler's alpha, or an internal error

MAX_BATCH = 4096  # ScoreBatch requests per call
# Flagged filters listed per verdict and kind, most extreme first: an input far from the training
# data can flag most of the filters, and building all of them would cost milliseconds.
MAX_FLAGS = 32


class ScoringUnavailable(Exception):
    """No usable store for a model (version); ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class StoreSlot:
    """One ``--store-dir`` entry: its scorer once loaded, or why it was refused."""

    name: str
    path: Path
    scorer: Scorer | None = None
    reason: str = ""   # metric label while refused
    problem: str = ""  # full text while refused


def class_verdict(scores: BatchScores, row: int) -> explain_pb2.ClassVerdict:
    """The API message of row ``row`` of ``scores``."""
    sample = scores.sample(row, max_flags=MAX_FLAGS)
    verdict = explain_pb2.ClassVerdict

    def flags(found) -> list:
        return [explain_pb2.FilterFlag(filter=f.filter, alpha=f.alpha, threshold=f.threshold, exemplars=f.exemplars)
                for f in found]

    return verdict(
        class_index=sample.class_id, class_name=sample.class_name,
        verdict=verdict.ANOMALOUS if sample.verdict == ANOMALOUS else verdict.NORMAL,
        beta=sample.beta, beta_percentile=sample.beta_percentile, beta_z=sample.beta_z, score=sample.score,
        reasons=[explain_pb2.VerdictReason(code=r.code, value=r.value, threshold=r.threshold, source=r.source)
                 for r in sample.reasons],
        surprise_count=int(scores.surprise_count[row]), expectation_count=int(scores.expectation_count[row]),
        surprising_filters=flags(sample.surprising), missing_filters=flags(sample.expected_missing),
    )


class AnomalyScoring:
    """Scores alpha vectors against per-class training distributions, per model.

    Parameters
    ----------
    metrics : GatewayMetrics
    store_dir : path, optional
        Folder of stores, one sub-folder per model name; None: no model is scored.
    """

    def __init__(self, metrics, store_dir: str | Path | None = None):
        self.metrics = metrics
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.slots: dict[str, StoreSlot] = {}
        self._listeners = []

    # -- stores ------------------------------------------------------------------------
    def load(self) -> None:
        """Load and verify every store of ``store_dir`` (blocking: reads every array once)."""
        if self.store_dir is None:
            log.warning("no --store-dir: Explain answers carry no anomaly verdict")
            return
        if not self.store_dir.is_dir():
            log.error("--store-dir %s is not a folder: Explain answers carry no anomaly verdict", self.store_dir)
            return
        for entry in sorted(self.store_dir.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            slot = self.slots[entry.name] = StoreSlot(entry.name, entry)
            self._load(slot)
        if not self.slots:
            log.error("--store-dir %s holds no store folder: Explain answers carry no anomaly verdict", self.store_dir)

    def _load(self, slot: StoreSlot) -> None:
        try:
            store = load_store(slot.path)
            meta = store.meta
            if meta.model_name != slot.name:
                self._refuse(slot, STORE_MISMATCH, f"distribution store {slot.path}: built for model {meta.model_name!r} "
                                                   f"version {meta.model_version!r}, not {slot.name!r}")
                return
            slot.scorer = Scorer(store)
        except StoreError as error:
            self._refuse(slot, STORE_REFUSED, str(error))
            return
        self.metrics.store_info.labels(slot.name, store.meta.model_version, store.sha256).set(1)
        self.metrics.store_build.labels(slot.name).set(store.build_timestamp)
        self.metrics.start_scoring(slot.name, store.num_classes)
        log.info("distribution store for model %r version %r loaded from %s: %d classes x %d filters, sha256 %s",
                 slot.name, store.meta.model_version, slot.path, store.num_classes, store.meta.num_filters, store.sha256)

    def _refuse(self, slot: StoreSlot, reason: str, problem: str) -> None:
        if slot.scorer is not None:
            store = slot.scorer.store
            self.metrics.store_info.remove(slot.name, store.meta.model_version, store.sha256)
            self.metrics.store_build.remove(slot.name)
        slot.scorer, slot.reason, slot.problem = None, reason, problem
        log.error("anomaly scoring unavailable for model %r: %s", slot.name, problem)

    def model_served(self, model: str, version: str) -> None:
        """TorchServe serves ``model`` in ``version`` by default: a store for another version is refused."""
        slot = self.slots.get(model)
        if slot is None or slot.scorer is None or not version:
            return
        built_for = slot.scorer.store.meta.model_version
        if built_for != version:
            self._refuse(slot, STORE_MISMATCH, f"distribution store {slot.path}: built for model {model!r} version "
                                               f"{built_for!r}, not {model!r} version {version!r} (served by TorchServe)")
            self._notify()

    @property
    def healthy(self) -> bool:
        """At least one store in use and none refused."""
        return bool(self.slots) and all(slot.scorer is not None for slot in self.slots.values())

    def on_health_change(self, callback) -> None:
        """Call ``callback(healthy: bool)`` whenever :attr:`healthy` changes after :meth:`load`."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback(self.healthy)

    def has_store(self, model: str) -> bool:
        """Whether ``--store-dir`` has an entry for ``model`` (usable or refused)."""
        return model in self.slots

    def scorer_for(self, model: str, version: str = "") -> Scorer:
        """The scorer of ``model``; ``version``, when given, must be the store's. Raises ScoringUnavailable."""
        slot = self.slots.get(model)
        if slot is None:
            raise ScoringUnavailable(NO_STORE, NO_STORE if self.store_dir is None else
                                     f"{NO_STORE} for model {model!r} in {self.store_dir}")
        if slot.scorer is None:
            raise ScoringUnavailable(slot.reason, f"{slot.reason}: {slot.problem}")
        built_for = slot.scorer.store.meta.model_version
        if version and version != built_for:
            raise ScoringUnavailable(STORE_MISMATCH, f"{STORE_MISMATCH}: the distribution store for model {model!r} "
                                                     f"is for version {built_for!r}, not {version!r}")
        return slot.scorer

    # -- Explain -----------------------------------------------------------------------
    def score(self, model: str, alpha, predicted_class: int, label: int | None = None, label_alpha=None, *,
              version: str = "") -> explain_pb2.AnomalyReport:
        """The AnomalyReport of one Explain answer, counted in the metrics; never raises.

        ``alpha`` was computed for ``predicted_class``, ``label_alpha`` (optional) for ``label``.
        """
        started = time.perf_counter()
        class_labels = self.metrics.class_labels(predicted_class)
        try:
            scorer = self.scorer_for(model, version)
            if not len(alpha):
                raise ScoringUnavailable(NO_ALPHA, f"{NO_ALPHA}: the handler returned no Grad-AMap filter scores")
            rows, classes = [alpha], [predicted_class]
            if label is not None and label_alpha is not None and len(label_alpha):
                rows.append(label_alpha)
                classes.append(label)
            batch = scorer.score(np.asarray(rows, dtype=np.float32), np.asarray(classes, dtype=np.int64))
            report = explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.OK, store_sha256=scorer.store.sha256,
                                               predicted=class_verdict(batch, 0))
            if len(batch) > 1:
                report.label.CopyFrom(class_verdict(batch, 1))
        except Exception as error:  # noqa: BLE001 - scoring never fails an Explain
            if isinstance(error, ScoringUnavailable):
                reason, message = error.reason, error.message
            else:
                reason, message = SCORING_FAILED, f"{SCORING_FAILED}: {error}"
                log.warning("anomaly scoring failed for model %r: %s", model, error,
                            exc_info=not isinstance(error, ValueError))
            self.metrics.verdicts.labels(model, "unavailable", *class_labels).inc()
            self.metrics.anomaly_unavailable.labels(model, reason, *class_labels).inc()
            return explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.UNAVAILABLE, reason=message)
        self.metrics.scoring_duration.observe(time.perf_counter() - started)
        predicted = report.predicted
        class_labels = self.metrics.class_labels(predicted.class_index)
        self.metrics.verdicts.labels(model, "anomalous" if batch.anomalous[0] else "normal", *class_labels).inc()
        self.metrics.surprise_flags.labels(model, *class_labels).inc(int(batch.surprise_count[0]))
        self.metrics.expectation_flags.labels(model, *class_labels).inc(int(batch.expectation_count[0]))
        self.metrics.beta.labels(model).observe(float(batch.beta[0]))
        return report

    # -- Score / ScoreBatch ------------------------------------------------------------
    def score_requests(self, requests, *, batch: bool) -> list[explain_pb2.AnomalyReport]:
        """Reports for ScoreRequests, with one vectorised scoring call per model.

        Raises ValueError naming the request field (``requests[i].`` first when ``batch``)
        or ScoringUnavailable. Not counted in the anomaly metrics, which describe Explain traffic.
        """
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.model, []).append(index)
        reports: list = [None] * len(requests)
        for model, indices in groups.items():
            for index, report in zip(indices, self._score_group(model, [requests[i] for i in indices],
                                                                [f"requests[{i}]." if batch else "" for i in indices])):
                reports[index] = report
        return reports

    def _score_group(self, model: str, requests: list, where: list[str]) -> list[explain_pb2.AnomalyReport]:
        """Score the requests of one model in one call; ``where`` prefixes each request's field names."""
        rows, classes, fields = [], [], []  # fields: (request position, alpha field, class field) per row
        scorer = None
        for position, request in enumerate(requests):
            if not request.alpha:
                raise ValueError(f"{where[position]}alpha: the request has no filter scores")
            if request.HasField("label") != bool(request.label_alpha):
                raise ValueError(f"{where[position]}label_alpha: give it exactly when label is set")
        for position, request in enumerate(requests):
            try:
                scorer = self.scorer_for(model, request.model_version)
            except ScoringUnavailable as error:
                raise ScoringUnavailable(error.reason, f"{where[position]}model: {error.message}") from None
            rows.append(request.alpha)
            classes.append(request.predicted_class)
            fields.append((position, "alpha", "predicted_class"))
            if request.HasField("label"):
                rows.append(request.label_alpha)
                classes.append(request.label)
                fields.append((position, "label_alpha", "label"))
        try:
            scored = scorer.score(np.asarray(rows, dtype=np.float32), np.asarray(classes, dtype=np.int64))
        except ValueError:  # name the first offending row
            for row, class_id, (position, alpha_field, class_field) in zip(rows, classes, fields):
                try:
                    scorer.score(np.asarray(row, dtype=np.float32), class_id)
                except ValueError as error:
                    known = 0 <= class_id < scorer.store.num_classes
                    raise ValueError(f"{where[position]}{alpha_field if known else class_field}: {error}") from None
            raise
        reports = [explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.OK, store_sha256=scorer.store.sha256)
                   for _ in requests]
        for row, (position, alpha_field, _) in enumerate(fields):
            verdict = class_verdict(scored, row)
            (reports[position].predicted if alpha_field == "alpha" else reports[position].label).CopyFrom(verdict)
        return reports
