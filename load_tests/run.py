"""Run one load scenario headless for a fixed time and user count, then summarise it.

    python -m load_tests.run steady --duration 120 --users 4            # starts a local server
    python -m load_tests.run malformed --target 127.0.0.1:50051 --image-model demo_image

Scenarios: steady, burst (x10 users in the middle third), anomalous (OOD images mixed in),
malformed (about 10 % bad requests). Writes ``<out>/<scenario>_stats.csv`` (and locust's other
CSV files), ``<scenario>_codes.csv`` and ``<scenario>_summary.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .local_server import local_server
from .summary import write_summary

SCENARIOS = ("steady", "burst", "anomalous", "malformed")
HERE = Path(__file__).resolve().parent
ANOMALY_COUNTERS = ("explainserve_anomaly_verdicts", "explainserve_anomaly_unavailable",
                    "explainserve_anomaly_surprise_flags", "explainserve_anomaly_expectation_flags")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--users", type=int, default=4, help="concurrent users (burst: before and after the burst)")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--duration", type=int, default=120, help="seconds of load")
    parser.add_argument("--out", type=Path, default=Path("out/load"))
    parser.add_argument("--target", help="host:port of a running gateway (default: start a local server)")
    parser.add_argument("--metrics-url", help="the gateway's /metrics, to report anomaly counter increases")
    parser.add_argument("--image-model", default="demo_image")
    parser.add_argument("--video-model", default="demo_video", help="'' sends no clips")
    parser.add_argument("--n-classes", type=int, default=8)
    args = parser.parse_args(argv)
    for name in ("users", "duration"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1")
    if args.spawn_rate <= 0:
        parser.error("--spawn-rate: must be positive")
    return args


def anomaly_counters(metrics_url: str | None) -> dict[str, float]:
    """Current values of the gateway's anomaly counters, by series."""
    if not metrics_url:
        return {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name in ANOMALY_COUNTERS:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def run_locust(args, target: str) -> int:
    """Run locust headless; returns its exit code (1 when any call had an unexpected status)."""
    args.out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "locust", "-f", str(HERE / f"{args.scenario}.py"), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--host", target,
               "--csv", str(args.out / args.scenario), "--only-summary", "--stop-timeout", "60",
               "--image-model", args.image_model, "--video-model", args.video_model, "--n-classes", str(args.n_classes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, env=env).returncode


def run(args, target: str, metrics_url: str | None) -> int:
    before = anomaly_counters(metrics_url)
    code = run_locust(args, target)
    after = anomaly_counters(metrics_url)
    deltas = {series: value - before.get(series, 0.0) for series, value in after.items()
              if value != before.get(series, 0.0)}
    settings = {"users": args.users, "spawn rate": args.spawn_rate, "duration s": args.duration, "target": target,
                "models": f"{args.image_model}, {args.video_model or '(no clips)'}"}
    print(write_summary(args.out / args.scenario, args.scenario, settings, deltas if metrics_url else None))
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.target:
        return run(args, args.target, args.metrics_url)
    with local_server(args.out) as server:
        args.image_model, args.video_model = server.image_model, server.video_model
        return run(args, server.target, server.metrics_url)


if __name__ == "__main__":
    sys.exit(main())
