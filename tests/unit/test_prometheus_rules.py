"""The alert rules load in Prometheus and behave as their promtool unit tests say.

promtool (Debian's prometheus package) checks rules.yml, runs rules_test.yml, and
checks prometheus.yml; the Python checks make sure the unit tests cover every alert
both firing and not firing, and that every alert carries its annotations.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")


def promtool(*args):
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def alert_rules():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config_passes():
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("threshold, broken, alert", [
    # The unit tests are not vacuous: changing one threshold makes them fail.
    ("ratio_rate5m > 0.05", "ratio_rate5m > 0.30", "ExplainserveAnomalousVerdictRatioHigh"),
    # A p-value alert at the uniform share itself (5 %) would fire on healthy traffic.
    ("p_value_below_0_05:ratio_rate30m > 0.10", "p_value_below_0_05:ratio_rate30m > 0.04",
     "ExplainserveAnomalyPValuesSkewed"),
])
def test_promtool_catches_a_broken_expectation(tmp_path, threshold, broken, alert):
    assert threshold in RULES.read_text()
    (tmp_path / "rules.yml").write_text(RULES.read_text().replace(threshold, broken))
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
    result = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    cases = [case for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        name = rule["alert"]
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == name]
        assert True in outcomes, f"{name} is never tested firing"
        assert False in outcomes, f"{name} is never tested not firing"


def test_the_required_alerts_exist():
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    required = {
        "ExplainserveAnomalousVerdictRatioHigh": "anomalous:ratio_rate5m",
        "ExplainserveSurpriseFlagSurge": "surprise_flags_per_request",
        "ExplainserveAnomalyPValuesSkewed": "p_value_below_0_05",
        "ExplainserveSidecarDown": 'up{job="explainserve-sidecar"}',
        "ExplainserveLatencyP95AboveSLO": "2.5",
        "ExplainserveModelWorkerDown": "explainserve_torchserve_workers",
        "ExplainserveStoreOlderThanModel": "explainserve_store_build_timestamp_seconds",
    }
    for name, fragment in required.items():
        assert fragment in expressions[name], name


def test_every_alert_has_severity_summary_description_and_runbook():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']} lacks {key}"


def test_ratios_come_from_recording_rules():
    """Alerts on ratios read recorded series rather than recomputing them."""
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    ratio_alerts = [rule for rule in alert_rules() if "ratio" in rule["expr"]]
    assert len(ratio_alerts) >= 3
    for rule in ratio_alerts:
        assert any(name in rule["expr"] for name in recorded), rule["alert"]


def test_every_alert_links_its_section_of_the_runbook():
    runbook = (PROMETHEUS_DIR.parents[1] / "docs" / "RUNBOOK.md").read_text()
    sections = {heading.lower() for heading in re.findall(r"^## (\S+)$", runbook, flags=re.M)}
    alerts = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"docs/RUNBOOK.md#{alert['alert'].lower()}"
    assert sections == {alert["alert"].lower() for alert in alerts}


def test_the_alertmanager_example_passes_amtool():
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("Debian's prometheus-alertmanager (amtool) is not installed")
    config = PROMETHEUS_DIR.parent / "alertmanager" / "alertmanager.yml"
    checked = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
