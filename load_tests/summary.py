"""Turn a locust run's CSV files into a short markdown summary.

Reads ``<prefix>_stats.csv`` (locust's per-name latency percentiles and throughput) and
``<prefix>_codes.csv`` (status codes and anomaly outcomes per name, from
:mod:`load_tests.grpc_user`), and optionally the gateway's anomaly counters before and after.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

PERCENTILES = ("50%", "95%", "99%")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def latency_table(stats: list[dict]) -> str:
    """Requests, failures (unexpected status), req/s and latency percentiles in ms, per name."""
    header = ["name", "requests", "unexpected", "req/s", *(f"p{p.rstrip('%')} ms" for p in PERCENTILES), "max ms"]
    rows = [[row["Name"], row["Request Count"], row["Failure Count"], f"{float(row['Requests/s']):.2f}",
             *(row[p] for p in PERCENTILES), f"{float(row['Max Response Time']):.0f}"] for row in stats]
    return markdown_table(header, rows)


def code_table(codes: list[dict]) -> str:
    """Calls per name and status code (the anomaly outcome of OK calls is summed in)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for row in codes:
        counts[row["name"], row["code"]] += int(row["count"])
    return markdown_table(["name", "status code", "calls"], [[n, c, k] for (n, c), k in sorted(counts.items())])


def anomaly_table(codes: list[dict]) -> str:
    """OK calls per name and anomaly outcome (unavailable, normal, anomalous)."""
    rows = [[row["name"], row["anomaly"], row["count"]] for row in codes if row["code"] == "OK"]
    return markdown_table(["name", "anomaly outcome", "calls"], rows)


def write_summary(prefix: Path, scenario: str, settings: dict, metric_deltas: dict[str, float] | None = None) -> str:
    """Write ``<prefix>_summary.md`` and return its text."""
    stats = read_rows(Path(f"{prefix}_stats.csv"))
    codes = read_rows(Path(f"{prefix}_codes.csv"))
    total = next(row for row in stats if row["Name"] == "Aggregated")
    errors = sum(int(row["count"]) for row in codes if row["code"] != "OK")
    parts = [
        f"# Load scenario `{scenario}`",
        ", ".join(f"{key}: {value}" for key, value in settings.items()),
        f"**{total['Request Count']} calls, {float(total['Requests/s']):.2f} req/s, "
        f"p50 {total['50%']} ms, p95 {total['95%']} ms, p99 {total['99%']} ms; "
        f"{errors} calls ended with a non-OK status, {total['Failure Count']} with an unexpected one.**",
        "## Latency and throughput", latency_table(stats),
        "## Status codes", "Counted by the gRPC user, including calls that ended while locust was stopping.",
        code_table(codes),
        "## Anomaly outcomes of answered calls", anomaly_table(codes),
    ]
    if metric_deltas:
        parts += ["## Gateway anomaly counters (increase during the run)",
                  markdown_table(["series", "increase"], [[k, f"{v:g}"] for k, v in sorted(metric_deltas.items())])]
    text = "\n\n".join(parts) + "\n"
    Path(f"{prefix}_summary.md").write_text(text)
    return text
