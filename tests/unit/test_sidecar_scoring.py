"""The gateway's store folder (AnomalyScoring) without any process: which folders are stores,
which model and version each may score, and the health it reports."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from explainserve._generated import explain_pb2
from explainserve.anomaly import build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.sidecar.metrics import GatewayMetrics
from explainserve.sidecar.scoring import AnomalyScoring

MODEL, FILTERS = "demo_image", 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A calibrated store of 3 synthetic classes for MODEL version 1.0."""
    synthetic = SyntheticClasses.random(3, FILTERS)
    meta = dataclasses.replace(synthetic.meta, model_name=MODEL, model_version="1.0")
    folder = build_store(synthetic.batches(200, batch_size=100), tmp_path_factory.mktemp("store") / MODEL, meta,
                         top_k=2, build_time="2026-01-01T00:00:00Z")
    classes = np.tile(np.arange(3), 100)
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(classes, seed=99), classes,
                                                   min_class_count=1))
    return folder


def test_store_folder_rules(store, tmp_path):
    stores = tmp_path / "stores"
    shutil.copytree(store, stores / MODEL)
    shutil.copytree(store, stores / "renamed")  # its manifest names demo_image
    (stores / ".shards").mkdir()
    (stores / "README").write_text("not a store")
    scoring = AnomalyScoring(GatewayMetrics(), stores)
    scoring.load()
    assert sorted(scoring.slots) == [MODEL, "renamed"] and not scoring.healthy
    refused = scoring.score("renamed", np.zeros(FILTERS, np.float32), 0)
    assert refused.status == explain_pb2.AnomalyReport.UNAVAILABLE
    assert refused.reason.startswith("store mismatch: ") and "built for model 'demo_image'" in refused.reason
    # a wrong alpha from a handler is never an error of the request
    wrong = scoring.score(MODEL, np.zeros(FILTERS // 2, np.float32), 0)
    assert wrong.status == explain_pb2.AnomalyReport.UNAVAILABLE and wrong.reason.startswith("scoring failed: ")
    assert scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0, version="1.0").status == explain_pb2.AnomalyReport.OK
    assert "version '1.0', not '7'" in scoring.score(MODEL, np.zeros(FILTERS, np.float32), 0, version="7").reason

    shutil.rmtree(stores / "renamed")
    healthy = AnomalyScoring(GatewayMetrics(), stores)
    changes = []
    healthy.on_health_change(changes.append)
    healthy.load()
    assert healthy.healthy
    healthy.model_served(MODEL, "1.0")
    assert healthy.healthy and changes == []
    healthy.model_served(MODEL, "1.1")  # TorchServe serves another version: refused
    assert not healthy.healthy and changes == [False]
    assert not AnomalyScoring(GatewayMetrics(), None).healthy  # nothing to score with
