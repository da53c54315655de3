"""Fault: the distribution store is republished 20 times under steady Explain and Score load.

Two calibrated stores for the fault model disagree on one fixed alpha vector (NORMAL under A,
ANOMALOUS under B). They are published alternately at ``--store-dir/<model>`` the way
``build-distributions`` publishes (:func:`explainserve.anomaly.publish.publishing`: a fresh
version folder, then a symlink swap; versions older than the previous one are deleted), while
clients call Explain and Score back to back. No call may fail, the gateway must not crash
(SIGBUS included), every answer must be scored (never UNAVAILABLE), and every Score answer's
verdict must be the one its ``store_sha256``'s store gives: the sha names the data scored.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from explainserve._generated import explain_pb2
from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.publish import publishing
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.client import ExplainClient
from support.fault_load import MODEL, BackgroundLoad, explain_call
from support.serving_harness import explainer_for, random_image, start_gateway, stop_gateway, store_meta_for, wait_for
from test_sidecar_anomaly import anomaly_health

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SWAPS = 20
SWAP_GAP = 0.5  # seconds between a swap being served and the next
EXPLAIN_CLIENTS, SCORE_CLIENTS = 2, 2
NORMAL, ANOMALOUS = explain_pb2.ClassVerdict.NORMAL, explain_pb2.ClassVerdict.ANOMALOUS


def calibrated_store(synthetic: SyntheticClasses, model, metadata: dict, out: Path) -> Path:
    meta = store_meta_for(synthetic.meta, model, metadata)
    build_store(synthetic.batches(60), out, meta, build_time="2026-01-01T00:00:00Z")
    classes = np.repeat(np.arange(len(meta.class_names)), 40)
    save_calibration(load_store(out), calibrate(load_store(out), synthetic.sample(classes, seed=9), classes,
                                                min_class_count=1000))
    return out


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory, fault_model):
    """Stores A and B for the fault model (B's class means three times A's) and an alpha vector,
    A's class-0 mean, that A finds NORMAL and B ANOMALOUS."""
    model, metadata = fault_model
    base = SyntheticClasses.random(len(metadata["class_names"]), explainer_for(model, metadata).num_filters)
    folder = tmp_path_factory.mktemp("two_stores")
    paths = [calibrated_store(base, model, metadata, folder / "a"),
             calibrated_store(SyntheticClasses(base.loc * 3, base.scale), model, metadata, folder / "b")]
    alpha = base.loc[0]
    verdicts = {}
    for path in paths:
        store = load_store(path)
        verdicts[store.sha256] = Scorer(store).score(alpha[None], np.array([0])).sample(0).verdict
    assert sorted(verdicts.values()) == ["ANOMALOUS", "NORMAL"], verdicts  # the check below can tell them apart
    return paths, alpha, {sha: NORMAL if verdict == "NORMAL" else ANOMALOUS for sha, verdict in verdicts.items()}


def publish_copy(source: Path, out: Path) -> None:
    with publishing(out) as folder:
        for file in source.iterdir():
            shutil.copy(file, folder / file.name)


def test_store_republished_20_times_under_load(fault_stack, two_stores, tmp_path):
    (store_a, store_b), alpha, expected = two_stores
    stores = tmp_path / "stores"
    publish_copy(store_a, stores / MODEL)
    process, target, _ = start_gateway(tmp_path, fault_stack.torchserve.grpc_target,
                                       fault_stack.torchserve.management_target,
                                       token_file=fault_stack.torchserve.key_file,
                                       extra_args=("--store-dir", str(stores), "--store-poll-interval", "0.1"))
    explain = explain_call(target, [random_image(500 + i) for i in range(EXPLAIN_CLIENTS)], timeout=30)
    score_clients: dict[int, ExplainClient] = {}

    def call(client: int, sequence: int):
        if client < EXPLAIN_CLIENTS:
            return explain(client, sequence).anomaly
        if client not in score_clients:
            score_clients[client] = ExplainClient(target)
        return score_clients[client].score(alpha, model=MODEL, predicted_class=0, timeout=10)

    def served(since: float, sha: str) -> bool:
        """Since ``since``, a Score answer carried ``sha``."""
        return any(c.client >= EXPLAIN_CLIENTS and c.code == grpc.StatusCode.OK and c.result.store_sha256 == sha
                   and c.started >= since for c in load.snapshot())

    swap_seconds = []
    try:
        wait_for(lambda: anomaly_health(target) == health_pb2.HealthCheckResponse.SERVING, timeout=60)
        with BackgroundLoad(call, EXPLAIN_CLIENTS + SCORE_CLIENTS) as load:
            for swap in range(SWAPS):
                source = (store_b, store_a)[swap % 2]
                sha = load_store(source).sha256
                published = time.monotonic()
                publish_copy(source, stores / MODEL)
                wait_for(lambda: served(published, sha), timeout=30, interval=0.02)
                swap_seconds.append(time.monotonic() - published)
                time.sleep(SWAP_GAP)  # Explain calls keep running across the swaps
            last = time.monotonic()  # Explain answers scored with the last store
            wait_for(lambda: sum(c.client < EXPLAIN_CLIENTS and c.started >= last and c.code == grpc.StatusCode.OK
                                 for c in load.snapshot()) >= EXPLAIN_CLIENTS, timeout=60)
        assert process.poll() is None, f"the gateway exited with code {process.returncode}"
    finally:
        stop_gateway(process)
    assert process.returncode == 0, process.returncode  # a SIGBUS would show as -7

    calls = load.calls
    failed = [(c.client, c.code, c.details) for c in calls if c.code != grpc.StatusCode.OK]
    assert not failed, failed[:5]
    reports = [c.result for c in calls]
    assert all(r.status == explain_pb2.AnomalyReport.OK for r in reports), {r.reason for r in reports}
    assert {r.store_sha256 for r in reports} == set(expected)
    scores = [c.result for c in calls if c.client >= EXPLAIN_CLIENTS]
    wrong = [(r.store_sha256[:12], r.predicted.verdict) for r in scores if r.predicted.verdict != expected[r.store_sha256]]
    assert not wrong, wrong[:5]
    changes = sum(a.store_sha256 != b.store_sha256 for a, b in zip(scores, scores[1:]))
    explains = sum(c.client < EXPLAIN_CLIENTS for c in calls)
    explain_shas = {c.result.store_sha256 for c in calls if c.client < EXPLAIN_CLIENTS}
    assert explains >= 2 * EXPLAIN_CLIENTS and explain_shas == set(expected) and changes >= SWAPS
    print(f"store republished {SWAPS} times under load: {explains} Explain and {len(scores)} Score calls, none "
          f"failed or unscored; every Score verdict matched its store_sha256; seconds until the sidecar served "
          f"each new store: median {np.median(swap_seconds):.2f}, max {max(swap_seconds):.2f}")
