"""The locust scenarios run headless against the shared stack and write their summaries.

Short runs (a few seconds): this checks the wiring (gRPC user, interceptor, expected status
codes, CSV and markdown output), not performance; ``make load`` is the real load run.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from support.fault_load import MODEL
from support.serving_harness import N_CLASSES

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.parametrize("scenario", ["malformed", "burst"])
def test_scenario_runs_headless_and_summarises(fault_stack, tmp_path, scenario):
    run = subprocess.run(
        [sys.executable, "-m", "load_tests.run", scenario, "--target", fault_stack.target, "--metrics-url",
         fault_stack.metrics_url, "--image-model", MODEL, "--video-model", "", "--n-classes", str(N_CLASSES),
         "--users", "2", "--spawn-rate", "10", "--duration", "6", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # 1 when a call had an unexpected status
    with open(tmp_path / f"{scenario}_codes.csv", newline="") as handle:
        codes = list(csv.DictReader(handle))
    answered = sum(int(row["count"]) for row in codes if row["code"] == "OK")
    assert answered > 0
    # 2 users never exceed the gateway's admission limit; the burst's 20 may, and are then shed at once
    valid_outcomes = {"OK", "SHED"} if scenario == "burst" else {"OK"}
    assert all(row["code"] in valid_outcomes or row["name"].startswith("bad: ") for row in codes), codes
    summary = (tmp_path / f"{scenario}_summary.md").read_text()
    assert f"# Load scenario `{scenario}`" in summary and "| Aggregated |" in summary
    # every answered call was counted by the gateway as an anomaly outcome (no store: unavailable)
    assert "explainserve_anomaly_verdicts_total{model=tiny_image,verdict=unavailable}" in summary
