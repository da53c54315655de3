"""Generate the explainserve Grafana dashboard (deploy/grafana/explainserve.json).

Run ``python deploy/grafana/generate_dashboard.py`` after editing; a test checks that
the committed JSON equals this script's output. Every query selects the Prometheus
data source through the ``datasource`` template variable and filters on the
``namespace`` and ``model`` variables (both default to all, which also matches a
local Prometheus without a namespace label).
"""
import json
from pathlib import Path

OUTPUT = Path(__file__).with_name("explainserve.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
MODEL = 'model=~"$model"'
SLO_SECONDS = 2.5
WIDTH, HEIGHT = 12, 8


def target(expr, legend, ref):
    """One Prometheus query of a panel."""
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title, kind, queries, unit="short", description="", **extra):
    """A panel; ``queries`` is a list of (expr, legend) pairs. Placed by :func:`layout`.
    Table panels query the latest values only (instant queries in table format)."""
    targets = [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]
    if kind == "table":
        for query in targets:
            query.update(instant=True, format="table")
    body = {"title": title, "type": kind, "datasource": DATASOURCE, "description": description,
            "targets": targets, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}
    body.update(extra)
    return body


def row(title):
    return {"title": title, "type": "row", "collapsed": False, "panels": []}


def quantiles(metric, by, selector, legend):
    """p50/p95/p99 of a histogram over the dashboard's rate interval."""
    expr = "histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))"
    return [(expr.format(q=q, by=by, metric=metric, sel=selector), f"{legend} p{round(q * 100)}")
            for q in (0.5, 0.95, 0.99)]


def slo_threshold():
    """A dashed red line at the latency SLO."""
    steps = [{"color": "green", "value": None}, {"color": "red", "value": SLO_SECONDS}]
    return {"defaults": {"unit": "s", "thresholds": {"mode": "absolute", "steps": steps},
                         "custom": {"thresholdsStyle": {"mode": "dashed"}}}, "overrides": []}


def panels():
    rate = "[$__rate_interval]"
    return [
        row("Traffic and latency"),
        panel("Request rate by RPC and status", "timeseries", [
            (f"sum by (rpc, code) (rate(explainserve_requests_total{{{NS}}}{rate}))", "{{rpc}} {{code}}"),
        ], unit="reqps", description="Requests answered by the gateway sidecar, by gRPC status code."),
        panel("In-flight requests", "timeseries", [
            (f"sum by (rpc) (explainserve_inflight_requests{{{NS}}})", "{{rpc}}"),
        ], description="Requests being served right now; the HPA's scaling metric."),
        panel("Explain latency by method (p50 / p95 / p99)", "timeseries",
              quantiles("explainserve_request_duration_seconds", "method", NS, "{{method}}"),
              description=f"End-to-end latency at the sidecar. The SLO is p95 <= {SLO_SECONDS} s.",
              fieldConfig=slo_threshold()),
        panel("TorchServe time by method (p50 / p95 / p99)", "timeseries",
              quantiles("explainserve_torchserve_duration_seconds", "method", NS, "{{method}}"),
              unit="s", description="Time spent in TorchServe (queue + handler), measured by the sidecar."),
        row("Anomaly detection"),
        panel("Anomalous verdict ratio", "timeseries", [
            (f"model:explainserve_anomaly_verdicts_anomalous:ratio_rate5m{{{NS},{MODEL}}}", "{{model}}"),
        ], unit="percentunit", description="Share of scored requests judged ANOMALOUS (5 m window): "
                                           "p-value below the store's target rate (1 % by default)."),
        panel("Verdict p-values below 0.05", "timeseries", [
            (f"model:explainserve_anomaly_p_value_below_0_05:ratio_rate30m{{{NS},{MODEL}}}", "{{model}}"),
        ], unit="percentunit", description="Share of verdict p-values below 0.05 (30 m window). Uniform "
                                           "in distribution: 5 %; well above it, the inputs drift."),
        panel("Verdict p-value distribution over time", "heatmap", [
            (f"sum by (le) (increase(explainserve_anomaly_p_value_bucket{{{NS},{MODEL}}}{rate}))", "{{le}}"),
        ], description="Histogram of verdict p-values; flat (uniform) for in-distribution inputs, "
                       "piling up at the bottom under a shift.",
            options={"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1}),
        panel("Tests firing per second", "timeseries", [
            (f"sum by (model, test) (rate(explainserve_anomaly_test_fired_total{{{NS},{MODEL}}}{rate}))",
             "{{model}} {{test}}"),
        ], unit="ops", description="Answers where one test's own p-value was below the target rate: "
                                   "surprise, missing or low_beta, and feature_mahalanobis or "
                                   "feature_residual for a store with the feature tests."),
        panel("Verdicts per second", "timeseries", [
            (f"sum by (model, verdict) (rate(explainserve_anomaly_verdicts_total{{{NS},{MODEL}}}{rate}))",
             "{{model}} {{verdict}}"),
        ], unit="reqps", description="Verdicts by result; 'unavailable' means no store could score."),
        panel("Surprise and expectation flags per request", "timeseries", [
            (f"model:explainserve_anomaly_surprise_flags_per_request:ratio_rate5m{{{NS},{MODEL}}}",
             "{{model}} surprising"),
            (f"model:explainserve_anomaly_expectation_flags_per_request:ratio_rate5m{{{NS},{MODEL}}}",
             "{{model}} expected but missing"),
        ], description="Filters above their 99.9th training percentile, and expected filters below "
                       "their 0.1th, per scored request (5 m window)."),
        panel("Surprise and expectation flag rates", "timeseries", [
            (f"sum by (model) (rate(explainserve_anomaly_surprise_flags_total{{{NS},{MODEL}}}{rate}))",
             "{{model}} surprising"),
            (f"sum by (model) (rate(explainserve_anomaly_expectation_flags_total{{{NS},{MODEL}}}{rate}))",
             "{{model}} expected but missing"),
        ], unit="ops", description="Flags counted per second."),
        panel("Beta distribution over time", "heatmap", [
            (f"sum by (le) (increase(explainserve_anomaly_beta_bucket{{{NS},{MODEL}}}{rate}))", "{{le}}"),
        ], description="Histogram of beta (mean filter score minus the class mean); low is atypical.",
            options={"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1}),
        panel("Beta quantiles", "timeseries",
              quantiles("explainserve_anomaly_beta", "model", f"{NS},{MODEL}", "{{model}}"),
              description="beta p50/p95/p99 per model."),
        panel("Anomaly scoring latency (p50 / p95 / p99)", "timeseries",
              quantiles("explainserve_anomaly_scoring_duration_seconds", "job", NS, "scoring"), unit="s"),
        panel("Scoring unavailable by reason", "timeseries", [
            (f"sum by (model, reason) (rate(explainserve_anomaly_unavailable_total{{{NS},{MODEL}}}{rate}))",
             "{{model}} {{reason}}"),
        ], unit="reqps", description="Requests answered without a verdict (missing or corrupt store)."),
        panel("Distribution stores", "table", [
            (f"explainserve_store_info{{{NS},{MODEL}}}", "{{model}} {{version}}"),
        ], description="Stores the sidecar has loaded: model, version, sha256.",
            options={"showHeader": True}),
        panel("Store build time minus model build time", "timeseries", [
            (f"explainserve_store_build_timestamp_seconds{{{NS},{MODEL}}}"
             f" - explainserve_model_build_timestamp_seconds{{{NS},{MODEL}}}", "{{model}}"),
        ], unit="s", description="Negative: the store predates its model and its thresholds are stale."),
        panel("Classes that can never be ANOMALOUS", "timeseries", [
            (f"explainserve_store_classes_never_anomalous{{{NS},{MODEL}}}", "{{model}}"),
        ], description="Classes whose store group ranks too few validation images for a p-value below the "
                       "target rate: their verdicts are always NORMAL. Above 0: recalibrate on more images."),
        row("Availability"),
        panel("Sidecar targets up", "stat", [
            (f'sum(up{{job="explainserve-sidecar",{NS}}})', "up"),
            (f'count(up{{job="explainserve-sidecar",{NS}}})', "targets"),
        ], description="Scraped sidecar targets that answer."),
        panel("TorchServe reachable from the sidecar", "timeseries", [
            (f"min by (instance) (explainserve_torchserve_up{{{NS}}})", "{{instance}}"),
            (f'min by (instance) (up{{job="explainserve-torchserve",{NS}}})', "{{instance}} metrics scrape"),
        ], description="1 when TorchServe answers the sidecar's ping / its metrics scrape."),
        row("TorchServe workers and queue"),
        panel("Workers by status", "timeseries", [
            (f"sum by (model, status) (explainserve_torchserve_workers{{{NS},{MODEL}}})", "{{model}} {{status}}"),
        ], description="From TorchServe's describe-model, polled by the sidecar."),
        panel("TorchServe queue time", "timeseries", [
            (f'max by (instance) (QueueTime{{job="explainserve-torchserve",{NS}}})', "{{instance}} last batch"),
            (f'sum by (model_name) (rate(ts_queue_latency_microseconds{{job="explainserve-torchserve",{NS}}}{rate}))'
             f' / 1e3 / sum by (model_name) (rate(ts_inference_requests_total{{job="explainserve-torchserve",{NS}}}{rate}))',
             "{{model_name}} mean (REST only)"),
        ], unit="ms", description="QueueTime is TorchServe's gauge (ms) for the last batch. The ts_* "
                                  "counters count REST requests only (not gRPC, TorchServe #1467); "
                                  "both are in milliseconds."),
        panel("TorchServe host utilisation", "timeseries", [
            (f'max by (instance) (CPUUtilization{{job="explainserve-torchserve",{NS}}})', "{{instance}} CPU"),
            (f'max by (instance) (MemoryUtilization{{job="explainserve-torchserve",{NS}}})', "{{instance}} memory"),
        ], unit="percent"),
    ]


def layout(items):
    """Place panels two per line under their rows (Grafana's 24-column grid)."""
    y, x = 0, 0
    for ident, item in enumerate(items, start=1):
        item["id"] = ident
        if item["type"] == "row":
            y += HEIGHT if x else 0
            item["gridPos"] = {"x": 0, "y": y, "w": 24, "h": 1}
            y, x = y + 1, 0
            continue
        item["gridPos"] = {"x": x, "y": y, "w": WIDTH, "h": HEIGHT}
        x = (x + WIDTH) % 24
        y += HEIGHT if x == 0 else 0
    return items


def variable(name, label, query):
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard():
    """The dashboard as a dict (Grafana JSON model)."""
    datasource = {"name": "datasource", "label": "Data source", "type": "datasource",
                  "query": "prometheus", "current": {}, "hide": 0, "refresh": 1}
    return {
        "uid": "explainserve",
        "title": "explainserve",
        "tags": ["explainserve", "torchserve", "anomaly-detection"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            datasource,
            variable("namespace", "Namespace", "label_values(explainserve_requests_total, namespace)"),
            variable("model", "Model", "label_values(explainserve_anomaly_verdicts_total, model)"),
        ]},
        "annotations": {"list": []},
        "panels": layout(panels()),
    }


def queries(board, rate_interval="5m"):
    """Every (panel title, PromQL) of ``board`` with the template variables filled in
    as Grafana would for "All" and the given rate interval, ready to evaluate."""
    filled = {"$namespace": ".*", "$model": ".*", "$__rate_interval": rate_interval}
    found = []
    for item in board["panels"]:
        for query in item.get("targets", []):
            expr = query["expr"]
            for name, value in filled.items():
                expr = expr.replace(name, value)
            found.append((item["title"], expr))
    return found


def render():
    """The dashboard as the JSON text that is committed."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
