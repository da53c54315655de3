"""Fault: the distribution store is corrupted, then removed, then restored, under steady load.

A second sidecar with ``--store-dir`` (polled every 0.3 s) stands in front of the shared fault
TorchServe. Throughout, no Explain call fails; while the store is corrupt or missing its answers
carry an UNAVAILABLE anomaly report saying why, the `anomaly` health service is NOT_SERVING and
explainserve_anomaly_unavailable_total grows; once the store is back, answers are scored again.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from explainserve._generated import explain_pb2
from explainserve.anomaly import build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.synthetic import SyntheticClasses
from support.fault_load import MODEL, BackgroundLoad, explain_call
from support.serving_harness import explainer_for, random_image, start_gateway, stop_gateway, store_meta_for, wait_for
from test_sidecar_anomaly import anomaly_health, corrupt, metric_value, metrics_text

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
OK, UNAVAILABLE = explain_pb2.AnomalyReport.OK, explain_pb2.AnomalyReport.UNAVAILABLE
CLIENTS = 3
CALLS_PER_PHASE = 6  # answers each phase must show, counted from when it was seen by the sidecar


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, fault_model) -> Path:
    """A calibrated store for the fault model, from synthetic filter scores (its verdicts mean
    nothing; only whether answers are scored matters here)."""
    model, metadata = fault_model
    synthetic = SyntheticClasses.random(len(metadata["class_names"]), explainer_for(model, metadata).num_filters)
    meta = store_meta_for(synthetic.meta, model, metadata)
    path = build_store(synthetic.batches(60), tmp_path_factory.mktemp("tiny_store") / MODEL, meta,
                       build_time="2026-01-01T00:00:00Z")
    store = load_store(path)
    classes = np.repeat(np.arange(len(meta.class_names)), 40)
    save_calibration(store, calibrate(store, synthetic.sample(classes, seed=9), classes, min_class_count=1000))
    return path


def test_store_corrupted_removed_and_restored_under_load(fault_stack, tiny_store, tmp_path):
    stack = fault_stack
    stores = tmp_path / "stores"
    shutil.copytree(tiny_store, stores / MODEL)
    sha256 = load_store(tiny_store).sha256
    process, target, metrics_url = start_gateway(tmp_path, stack.torchserve.grpc_target,
                                                 stack.torchserve.management_target, token_file=stack.torchserve.key_file,
                                                 extra_args=("--store-dir", str(stores), "--store-poll-interval", "0.3"))
    serving, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    images = [random_image(300 + i) for i in range(CLIENTS)]
    load = BackgroundLoad(explain_call(target, images, timeout=30), CLIENTS)
    phases = {}  # phase -> (seconds until an answer showed it, answers checked)

    def phase(name: str, status: int, health: int, *texts: str) -> None:
        """Wait for an answer scored the new way, then check the `anomaly` health and that every
        answer to a call started after it is scored that way too."""
        changed = time.monotonic()

        def shows(call) -> bool:
            report = call.result.anomaly
            return report.status == status and all(text in report.reason for text in texts)

        def answered(since: float) -> list:
            return [c for c in load.snapshot() if c.started >= since and c.code == grpc.StatusCode.OK]

        wait_for(lambda: any(shows(c) for c in answered(changed)), timeout=20, interval=0.05)
        seen = time.monotonic()
        wait_for(lambda: anomaly_health(target) == health, timeout=5, interval=0.05)  # set just after the swap
        wait_for(lambda: len(answered(seen)) >= CALLS_PER_PHASE, timeout=30)
        reports = [c.result.anomaly for c in answered(seen)]
        assert all(shows(c) for c in answered(seen)), {(r.status, r.reason) for r in reports}
        phases[name] = (round(seen - changed, 2), len(reports))

    try:
        wait_for(lambda: anomaly_health(target) == serving, timeout=60)
        before = metrics_text(metrics_url)
        with load:
            phase("scored", OK, serving)
            corrupt(stores / MODEL)
            phase("corrupt", UNAVAILABLE, down, "store refused: ", "p_high.npy sha256 does not match")
            shutil.rmtree(stores / MODEL)
            phase("removed", UNAVAILABLE, down, "store removed: ", "was removed from --store-dir")
            shutil.copytree(tiny_store, stores / f".{MODEL}.tmp")  # restored the documented way
            os.rename(stores / f".{MODEL}.tmp", stores / MODEL)
            phase("restored", OK, serving)
        after = metrics_text(metrics_url)
    finally:
        stop_gateway(process)

    calls = load.calls
    failed = [(c.code, c.details) for c in calls if c.code != grpc.StatusCode.OK]
    assert not failed, failed
    assert calls[-1].result.anomaly.store_sha256 == sha256
    increase = {reason: metric_value(after, "explainserve_anomaly_unavailable_total", model=MODEL, reason=reason)
                - metric_value(before, "explainserve_anomaly_unavailable_total", model=MODEL, reason=reason)
                for reason in ("store refused", "store removed")}
    assert all(count >= CALLS_PER_PHASE for count in increase.values()), increase
    assert metric_value(after, "explainserve_store_info", model=MODEL, sha256=sha256) == 1
    log_text = (tmp_path / "gateway.log").read_text()
    assert log_text.count("was removed from --store-dir") == 1 and log_text.count("sha256 does not match") == 1
    print(f"store faults under load: {len(calls)} Explain calls, none failed; seconds until the sidecar saw each "
          f"change and answers checked: {phases}; unavailable counter increase {increase}")
