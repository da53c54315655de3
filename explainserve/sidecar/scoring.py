"""The one place where the gateway scores Grad-AMap filter scores for anomalies.

Stores come from ``--store-dir DIR``: one calibrated store per model in ``DIR/<model name>/``
(``explainserve build-distributions --out DIR/<name>``); entries whose name starts with ``.``
(``.shards/``) and plain files are skipped. Every store is loaded and verified (sha256) at
start-up and refused, with a logged reason, when it is corrupt, truncated, uncalibrated, or
names another model than its folder; it is refused later when TorchServe turns out to serve
the model (by default) in another version than the store's manifest names.

Stores are reloaded while serving (:meth:`AnomalyScoring.watch`, and :meth:`AnomalyScoring.wake`
on SIGHUP): a store folder whose fingerprint (its inode, and every file's name, mtime, size and
inode) changed is verified again off the event loop, and the result replaces the model's slot
in one assignment; a request keeps the scorer it started with. A folder that disappeared is
unavailable ("store removed") until it is back. A store that fails to load while its folder
changes under the read is not refused: the store in use stays until the next check.

A store is read into memory through one open folder (``load_store(into_memory=True)``): the
scored arrays are exactly the bytes whose sha256 was verified, which every answer's
``store_sha256`` names, and no file stays mapped, so nothing a writer does to the folder can
change them or fault the gateway. ``build-distributions`` and ``merge-distributions`` publish a
store by swapping a symlink to a complete new version folder (:mod:`explainserve.anomaly.publish`).

A refused or missing store never fails a request: Explain answers carry an UNAVAILABLE
anomaly report with the reason. Health (:attr:`AnomalyScoring.healthy`): SERVING when at least
one store is in use and none was refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from explainserve._generated import explain_pb2
from explainserve.anomaly import ANOMALOUS, BatchScores, Scorer, StoreError, load_store
from explainserve.anomaly.calibration import classes_never_anomalous, never_anomalous_warning
from explainserve.anomaly.conformal import FIVE_TESTS, TESTS
from explainserve.anomaly.scorer import MAX_FLAGS

log = logging.getLogger(__name__)

# Values of the `reason` label of explainserve_anomaly_unavailable_total (a bounded set);
# AnomalyReport.reason carries the full text.
NO_STORE = "no distribution store"
STORE_REFUSED = "store refused"          # corrupt, truncated, uncalibrated, unreadable
STORE_MISMATCH = "store mismatch"        # built for another model or version
STORE_REMOVED = "store removed"          # its folder left --store-dir while serving
NO_ALPHA = "no filter scores"            # the handler returned no alpha
SCORING_FAILED = "scoring failed"        # the scorer refused the handler's alpha, or an internal error

MAX_BATCH = 4096  # ScoreBatch requests per call


class ScoringUnavailable(Exception):
    """No usable store for a model (version); ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class StoreSlot:
    """One ``--store-dir`` entry: its scorer once loaded, or why it was refused.

    Never changed in place: a transition puts a new slot into :attr:`AnomalyScoring.slots`, so a
    reader holding a slot sees one consistent state.
    """

    name: str
    path: Path
    scorer: Scorer | None = None
    reason: str = ""   # metric label while refused
    problem: str = ""  # full text while refused
    fingerprint: object = None  # folder_fingerprint() taken before the store was read

    @property
    def state(self) -> tuple:
        """What a transition changes: the store in use (sha256, version) or the refusal."""
        if self.scorer is None:
            return None, self.reason, self.problem
        return self.scorer.store.sha256, self.scorer.store.meta.model_version


def folder_fingerprint(path: Path):
    """Cheap change check of a store folder (a few stat calls): the folder's inode and every
    entry's (name, mtime_ns, size, inode); None when the folder is gone."""
    try:
        folder = path.stat()
        with os.scandir(path) as entries:
            listing = sorted((entry.name, *_stat_key(entry.stat())) for entry in entries)
    except FileNotFoundError:
        return None
    except OSError as error:  # a file went away between the listing and its stat: look again
        return ("unreadable", str(error), time.monotonic_ns())
    return folder.st_ino, tuple(listing)


def _stat_key(stat: os.stat_result) -> tuple:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def class_verdict(scores: BatchScores, row: int, into: explain_pb2.ClassVerdict | None = None) -> explain_pb2.ClassVerdict:
    """The API message of row ``row`` of ``scores``, written into ``into`` (a field of the
    answer, which saves copying the flags there) or a new message."""
    sample = scores.sample(row, max_flags=0)  # the flags are read as columns below
    verdict = explain_pb2.ClassVerdict() if into is None else into
    # Fields set one by one and flags added in place from their columns: building a FilterFlag
    # tuple, then a message of its own per flag and copying it into the list cost twice as long.
    verdict.class_index = sample.class_id
    verdict.class_name = sample.class_name
    verdict.verdict = explain_pb2.ClassVerdict.ANOMALOUS if sample.verdict == ANOMALOUS else explain_pb2.ClassVerdict.NORMAL
    verdict.beta, verdict.beta_percentile, verdict.beta_z = sample.beta, sample.beta_percentile, sample.beta_z
    verdict.score, verdict.p_value, verdict.target_fpr = sample.score, sample.p_value, scores.scorer.target_fpr
    verdict.smallest_p_value = sample.smallest_p_value
    verdict.surprise, verdict.missing = sample.surprise, sample.missing
    for reason in sample.reasons:
        added = verdict.reasons.add(code=reason.code, value=reason.value, threshold=reason.threshold,
                                    source=reason.source, p_value=reason.p_value)
        for feature, share in reason.features:  # a feature test's top features; none for the alpha tests
            added.features.add(feature=feature, share=share)
    verdict.surprise_count = int(scores.surprise_count[row])
    verdict.expectation_count = int(scores.expectation_count[row])
    for served, kind in ((verdict.surprising_filters, "surprising"), (verdict.missing_filters, "expected_missing")):
        add = served.add
        for filter_index, alpha, threshold, exemplars, exceedance in zip(*scores.flag_columns(row, kind, MAX_FLAGS)):
            message = add()
            message.filter, message.alpha, message.threshold, message.exceedance = filter_index, alpha, threshold, exceedance
            message.exemplars.extend(exemplars)
    verdict.pooled_distribution = bool(scores.scorer.reference.pooled[sample.class_id])
    if sample.feature_mahalanobis is not None:  # scored with the feature tests
        verdict.feature_mahalanobis, verdict.feature_residual = sample.feature_mahalanobis, sample.feature_residual
    return verdict


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
        # model -> (version TorchServe serves by default, its handler's describe())
        self._served: dict[str, tuple[str, dict]] = {}
        self._wake = asyncio.Event()  # set by wake(); bound to the loop that first waits on it
        self._forced = False

    # -- stores ------------------------------------------------------------------------
    def load(self) -> None:
        """Load and verify every store of ``store_dir`` (blocking: reads every array once)."""
        if self.store_dir is None:
            log.warning("no --store-dir: Explain answers carry no anomaly verdict")
            return
        if not self.store_dir.is_dir():
            log.error("--store-dir %s is not a folder: Explain answers carry no anomaly verdict", self.store_dir)
            return
        self.apply(self.scan(force=True), notify=False)
        if not self.slots:
            log.error("--store-dir %s holds no store folder: Explain answers carry no anomaly verdict", self.store_dir)

    def store_folders(self) -> dict[str, Path]:
        """``store_dir``'s store folders by model name; ``.``-entries and plain files are skipped."""
        if self.store_dir is None or not self.store_dir.is_dir():
            return {}
        return {entry.name: entry for entry in sorted(self.store_dir.iterdir())
                if not entry.name.startswith(".") and entry.is_dir()}

    def scan(self, force: bool = False) -> list[StoreSlot]:
        """New slots for the store folders that changed since they were read (all with
        ``force``), each verified again, and for the folders that disappeared. Blocking (reads
        and hashes the changed stores); changes nothing: hand the result to :meth:`apply`."""
        folders = self.store_folders()
        changed = []
        for name in sorted(set(folders) | set(self.slots)):
            path = folders.get(name, self.store_dir / name)
            fingerprint = folder_fingerprint(path) if name in folders else None
            slot = self.slots.get(name)
            if slot is not None and not force and fingerprint == slot.fingerprint:
                continue
            if fingerprint is None:
                changed.append(StoreSlot(name, path, reason=STORE_REMOVED, fingerprint=None,
                                         problem=f"distribution store {path} was removed from --store-dir"))
                continue
            opened = self._open(name, path, fingerprint)
            if opened.scorer is None and folder_fingerprint(path) != fingerprint:
                # written or swapped while it was read: keep the store in use, look again next time
                log.info("distribution store %s changed while it was read; reading it again at the next check", path)
                continue
            changed.append(opened)
        return changed

    @staticmethod
    def _open(name: str, path: Path, fingerprint) -> StoreSlot:
        """The slot of the store in ``path``, loaded and verified, or refused with the reason."""
        try:
            store = load_store(path, into_memory=True)  # no file stays mapped: a writer cannot change what is scored
            meta = store.meta
            if meta.model_name != name:
                return StoreSlot(name, path, None, STORE_MISMATCH, f"distribution store {path}: built for model "
                                 f"{meta.model_name!r} version {meta.model_version!r}, not {name!r}", fingerprint)
            return StoreSlot(name, path, Scorer(store), fingerprint=fingerprint)
        except StoreError as error:
            return StoreSlot(name, path, None, STORE_REFUSED, str(error), fingerprint)
        except OSError as error:  # a file vanished or became unreadable while it was read
            return StoreSlot(name, path, None, STORE_REFUSED, f"distribution store {path}: {error}", fingerprint)

    def apply(self, slots: list[StoreSlot], *, notify: bool = True) -> None:
        """Put ``slots`` (from :meth:`scan`) in use, one assignment each; logs and exports every
        transition once and, with ``notify``, tells the health listeners when :attr:`healthy`
        changed. Call it where the slots are read (the event loop) so that it does not
        interleave with a request."""
        was_healthy = self.healthy
        for slot in slots:
            slot = self._checked(slot)
            old = self.slots.get(slot.name)
            if old is not None and old.state == slot.state:
                # the same store (or the same refusal) again: keep the scorer in use, log nothing
                self.slots[slot.name] = replace(old, fingerprint=slot.fingerprint)
                continue
            self._transition(old, slot)
        if notify and self.healthy != was_healthy:
            self._notify()

    def _transition(self, old: StoreSlot | None, new: StoreSlot) -> None:
        if old is not None and old.scorer is not None:
            store = old.scorer.store
            self.metrics.store_info.remove(old.name, store.meta.model_version, store.sha256)
            self.metrics.store_build.remove(old.name)
            self.metrics.store_never_anomalous.remove(old.name)
        self.slots[new.name] = new
        if new.scorer is None:
            log.error("anomaly scoring unavailable for model %r: %s", new.name, new.problem)
            return
        store = new.scorer.store
        self.metrics.store_info.labels(new.name, store.meta.model_version, store.sha256).set(1)
        self.metrics.store_build.labels(new.name).set(store.build_timestamp)
        self.metrics.start_scoring(new.name, store.num_classes, FIVE_TESTS if new.scorer.has_feature_tests else TESTS)
        log.info("distribution store for model %r version %r %s from %s: %d classes x %d filters, sha256 %s",
                 new.name, store.meta.model_version, "loaded" if old is None else "reloaded", new.path,
                 store.num_classes, store.meta.num_filters, store.sha256)
        never = sum(map(len, classes_never_anomalous(store.calibration).values()))
        self.metrics.store_never_anomalous.labels(new.name).set(never)
        if never:
            log.warning("distribution store for model %r: %s (explainserve recalibrate-distributions)", new.name,
                        never_anomalous_warning(store.calibration, list(store.meta.class_names)))

    def reload(self, force: bool = False) -> None:
        """:meth:`scan` then :meth:`apply`, blocking (tests and tools; the gateway uses :meth:`watch`)."""
        self.apply(self.scan(force))

    def wake(self) -> None:
        """Make :meth:`watch` verify every store now (SIGHUP), changed or not."""
        self._forced = True
        self._wake.set()

    async def watch(self, interval: float | None) -> None:
        """Reload changed stores every ``interval`` seconds (None: only when woken), verifying
        them in a worker thread and swapping them in on the event loop."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            force, self._forced = self._forced, False
            try:
                self.apply(await asyncio.to_thread(self.scan, force))
            except Exception:  # noqa: BLE001 - a failed look at the folder must not end the watch
                log.exception("reloading the distribution stores of %s failed", self.store_dir)

    def _checked(self, slot: StoreSlot) -> StoreSlot:
        """``slot``, or its refusal when TorchServe serves another version of the model, or the
        same version explained at another layer, filter count, input size or normalisation."""
        if slot.scorer is None or slot.name not in self._served:
            return slot
        version, described = self._served[slot.name]
        meta = slot.scorer.store.meta
        if meta.model_version != version:
            problem = (f"built for model {slot.name!r} version {meta.model_version!r}, not {slot.name!r} version "
                       f"{version!r} (served by TorchServe)")
        elif misfits := meta.misfits(described):
            problem = (f"built on model {slot.name!r} at {'; '.join(misfits)}, as TorchServe's handler explains it "
                       f"(the archive changed after the store was built): its verdicts would mean nothing; rebuild "
                       f"the store from the served archive")
        else:
            return slot
        return StoreSlot(slot.name, slot.path, None, STORE_MISMATCH,
                         f"distribution store {slot.path}: {problem}", slot.fingerprint)

    def model_served(self, model: str, version: str, described: dict | None = None) -> None:
        """TorchServe serves ``model`` in ``version`` by default, as its handler ``described`` it:
        a store for another version, or built at another layer, filter count, input size or
        normalisation (:meth:`StoreMeta.misfits`), is refused, now and when it is reloaded."""
        if not version:
            return
        self._served[model] = (version, described or {})
        slot = self.slots.get(model)
        if slot is None:
            return
        checked = self._checked(slot)
        if checked is not slot:
            self._transition(slot, checked)
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
        return self._usable(self.slots.get(model), model, version)

    def _usable(self, slot: StoreSlot | None, model: str, version: str) -> Scorer:
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
              features=None, version: str = "") -> explain_pb2.AnomalyReport:
        """The AnomalyReport of one Explain answer, counted in the metrics; never raises.

        ``alpha`` was computed for ``predicted_class``, ``label_alpha`` (optional) for ``label``;
        ``features`` (optional, (K,)) are the input's pooled features, scored with both.
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
            # The pooled features are the input's, whichever class a row is scored against.
            pooled = None if features is None else np.tile(np.asarray(features, dtype=np.float32), (len(rows), 1))
            batch = scorer.score(np.asarray(rows, dtype=np.float32), np.asarray(classes, dtype=np.int64), features=pooled)
            report = explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.OK, store_sha256=scorer.store.sha256)
            class_verdict(batch, 0, into=report.predicted)
            if len(batch) > 1:
                class_verdict(batch, 1, into=report.label)
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
        self.metrics.p_value.labels(model).observe(float(batch.p_value[0]))
        for test, p_value in zip(batch.test_names, batch.p_values[0, :-1]):
            if p_value < scorer.target_fpr:
                self.metrics.test_fired.labels(model, test).inc()
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
        """Score the requests of one model, in one call for those with features and one for those
        without; ``where`` prefixes each request's field names."""
        rows = []  # (request position, alpha field, class field, alpha, class, features or None) per scored row
        scorer = None
        slot = self.slots.get(model)  # one store for the whole group, even if it is reloaded meanwhile
        for position, request in enumerate(requests):
            if not request.alpha:
                raise ValueError(f"{where[position]}alpha: the request has no filter scores")
            if request.HasField("label") != bool(request.label_alpha):
                raise ValueError(f"{where[position]}label_alpha: give it exactly when label is set")
        for position, request in enumerate(requests):
            try:
                scorer = self._usable(slot, model, request.model_version)
            except ScoringUnavailable as error:
                raise ScoringUnavailable(error.reason, f"{where[position]}model: {error.message}") from None
            features = request.features or None  # the input's pooled features serve the label row too
            rows.append((position, "alpha", "predicted_class", request.alpha, request.predicted_class, features))
            if request.HasField("label"):
                rows.append((position, "label_alpha", "label", request.label_alpha, request.label, features))
        # Rows with features and rows without are scored in one call each (the feature tests need them on every row).
        parts = [part for part in ([row for row in rows if row[5] is None], [row for row in rows if row[5] is not None])
                 if part]
        try:
            scored = [score_rows(scorer, part) for part in parts]
        except ValueError as error:
            raise first_refusal(scorer, rows, where) or error from None
        reports = [explain_pb2.AnomalyReport(status=explain_pb2.AnomalyReport.OK, store_sha256=scorer.store.sha256)
                   for _ in requests]
        for part, scores in zip(parts, scored):
            for index, (position, alpha_field, *_) in enumerate(part):
                class_verdict(scores, index, into=reports[position].predicted if alpha_field == "alpha"
                              else reports[position].label)
        return reports


def score_rows(scorer: Scorer, rows: list) -> BatchScores:
    """Score ``rows`` ((request position, alpha field, class field, alpha, class, features or None)
    each; all with features or none) in one call."""
    features = None if rows[0][5] is None else np.asarray([row[5] for row in rows], dtype=np.float32)
    return scorer.score(np.asarray([row[3] for row in rows], dtype=np.float32),
                        np.asarray([row[4] for row in rows], dtype=np.int64), features=features)


def first_refusal(scorer: Scorer, rows: list, where: list[str]) -> ValueError | None:
    """The refusal of the first of ``rows`` (see :func:`score_rows`) that the scorer refuses on its
    own, naming its request field (``requests[2].features: ...``); None if each passes alone."""
    for row in rows:
        position, alpha_field, class_field, _, class_id, _ = row
        try:
            score_rows(scorer, [row])
        except ValueError as error:
            if str(error).startswith("features"):
                field = "features"
            else:
                field = alpha_field if 0 <= class_id < scorer.store.num_classes else class_field
            return ValueError(f"{where[position]}{field}: {error}")
    return None
