"""The Grafana dashboard: generated from code, valid JSON, one datasource variable,
the panels on-call needs, and only syntactically valid PromQL (checked by promtool)."""
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "explainserve.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA_DIR / "generate_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()


@pytest.fixture(scope="module")
def board():
    return json.loads(DASHBOARD.read_text())


def promql_errors(expressions, workdir):
    """promtool's verdict on ``expressions``, each wrapped as a recording rule."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(expressions)]}]}
    path = workdir / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    return None if result.returncode == 0 else result.stdout + result.stderr


def test_committed_json_is_the_generator_output():
    assert DASHBOARD.read_text() == generator.render(), \
        "run: python deploy/grafana/generate_dashboard.py"


def test_uses_a_prometheus_datasource_variable_everywhere(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for item in board["panels"]:
        if item["type"] == "row":
            continue
        assert item["datasource"]["uid"] == "${datasource}", item["title"]
        assert item["targets"], item["title"]
        for query in item["targets"]:
            assert query["datasource"]["uid"] == "${datasource}", item["title"]


def test_panels_do_not_overlap(board):
    cells = set()
    for item in board["panels"]:
        pos = item["gridPos"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert pos["x"] + pos["w"] <= 24
        assert not cells & area, item["title"]
        cells |= area
    assert len({item["id"] for item in board["panels"]}) == len(board["panels"])


@pytest.mark.parametrize("fragments", [
    ["rate(explainserve_requests_total"],                                       # request rate
    ["histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99",
     "explainserve_request_duration_seconds_bucket", "by (le, method)"],        # latency by method
    ["model:explainserve_anomaly_verdicts_anomalous:ratio_rate5m"],             # verdict ratio
    ["explainserve_anomaly_surprise_flags_total", "explainserve_anomaly_expectation_flags_total"],
    ["explainserve_anomaly_beta_bucket"],                                       # beta over time
    ["model:explainserve_anomaly_p_value_below_0_05:ratio_rate30m",
     "explainserve_anomaly_p_value_bucket", "explainserve_anomaly_test_fired_total"],  # p-values, tests
    ['up{job="explainserve-sidecar"', "explainserve_torchserve_up"],            # availability
    ["explainserve_torchserve_workers", "QueueTime"],                           # workers and queue
    ["explainserve_store_classes_never_anomalous"],                             # a store that cannot flag
])
def test_required_panels_exist(board, fragments):
    exprs = " ".join(expr for _, expr in generator.queries(board))
    for fragment in fragments:
        assert fragment in exprs, fragment


def test_beta_panel_is_a_heatmap_of_buckets(board):
    heatmaps = [item for item in board["panels"] if item["type"] == "heatmap"]
    assert any("explainserve_anomaly_beta_bucket" in t["expr"] and "by (le)" in t["expr"]
               for item in heatmaps for t in item["targets"])


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")
def test_every_expr_is_valid_promql(board, tmp_path):
    expressions = [expr for _, expr in generator.queries(board)]
    assert len(expressions) >= 20
    assert "$" not in " ".join(expressions), "a template variable was left unfilled"
    assert promql_errors(expressions, tmp_path) is None, promql_errors(expressions, tmp_path)


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")
def test_the_promql_check_rejects_a_broken_expr(tmp_path):
    errors = promql_errors(["sum by (model (rate(explainserve_requests_total[5m]))"], tmp_path)
    assert errors and "parse error" in errors
