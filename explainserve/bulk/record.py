"""results.jsonl: one JSON object per input, appended as each input finishes.

A line holds the input's ``id`` and ``path``, ``status`` ("ok" or "error"), and either
``error`` ({"code", "message"}) or the answer: ``model``, ``predicted`` and ``top_k``
({"index", "name", "score"}), ``verdict`` (NORMAL / ANOMALOUS, null when the model has no
store), ``anomaly_status``, ``score`` (the verdict's combined statistic, a ranking), ``p_value`` (its conformal
p-value), ``smallest_p_value`` (the smallest the store can give the class: at or above the target
rate, never ANOMALOUS), ``beta``, ``surprise_count``, ``expectation_count``, ``label_verdict``, ``region``
(the surprise region's filter and exemplars), ``timings`` (seconds: the gateway's stages and
``client``, the whole call as the client saw it), ``attempts`` and ``pictures`` (paths under
the output folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from explainserve._generated import explain_pb2

RESULTS = "results.jsonl"
# Codes of failures a rerun tries again; any other line is final and its input skipped.
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def verdict_fields(verdict: explain_pb2.ClassVerdict) -> dict:
    fields = {
        "class_index": verdict.class_index, "class_name": verdict.class_name,
        "verdict": explain_pb2.ClassVerdict.Verdict.Name(verdict.verdict),
        "score": verdict.score, "beta": verdict.beta,
        "surprise_count": verdict.surprise_count, "expectation_count": verdict.expectation_count,
        "p_value": verdict.p_value, "smallest_p_value": verdict.smallest_p_value,
    }
    return fields


def ok_line(item, result, seconds: float, attempts: int, pictures: dict[str, str]) -> dict:
    """The line of an answered input (``result``: an :class:`explainserve.client.ExplainResult`)."""
    anomaly = result.anomaly
    classes = [{"index": i, "name": name, "score": score} for i, name, score in result.classes]
    line = {
        "id": item.id, "path": str(item.path), "label": item.label, "status": "ok", "error": None,
        "model": result.model, "model_version": result.model_version,
        "predicted": next((c for c in classes if c["index"] == result.predicted_class),
                          {"index": result.predicted_class, "name": "", "score": None}),
        "top_k": classes,
        "anomaly_status": explain_pb2.AnomalyReport.Status.Name(anomaly.status),
        "verdict": None, "score": None, "p_value": None, "smallest_p_value": None, "beta": None,
        "surprise_count": None, "expectation_count": None, "label_verdict": None, "region": None,
        "timings": {**result.timings, "client": seconds}, "attempts": attempts, "pictures": pictures,
    }
    if anomaly.status == explain_pb2.AnomalyReport.OK and anomaly.HasField("predicted"):
        predicted = verdict_fields(anomaly.predicted)
        line.update({key: predicted.get(key) for key in
                     ("verdict", "score", "p_value", "smallest_p_value", "beta", "surprise_count",
                      "expectation_count")})
        if anomaly.HasField("label"):
            line["label_verdict"] = verdict_fields(anomaly.label)
        if anomaly.predicted.HasField("surprise_region"):
            region = anomaly.predicted.surprise_region
            line["region"] = {"filter": region.filter, "exemplars": list(region.exemplars),
                              "top_segment": region.top_segment}
    return line


def error_line(item, code: str, message: str, seconds: float = 0.0, attempts: int = 0) -> dict:
    """The line of an input that failed: ``code`` is a gRPC status name or BAD_INPUT."""
    return {"id": item.id, "path": str(item.path), "label": item.label, "status": "error",
            "error": {"code": code, "message": message}, "timings": {"client": seconds}, "attempts": attempts}


def read_results(folder: Path) -> dict[str, dict]:
    """The last line per input id in ``folder/results.jsonl`` ({} without one); a line cut short
    by a crash is ignored."""
    lines = {}
    path = Path(folder) / RESULTS
    if not path.is_file():
        return lines
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        lines[line["id"]] = line
    return lines


def is_final(line: dict) -> bool:
    """Whether a rerun skips this input: answered, or failed for a reason a retry won't fix."""
    return line["status"] == "ok" or line["error"]["code"] not in TRANSIENT
