"""Anomaly scoring speed and memory with a synthetic 1000-class x 2048-filter store.

In-process (always): builds the store with the real builder, calibrates it, and prints

- ``store_serving_mb``: arrays the scorer reads (mean, P0.1, P99.9, exemplars, β grid);
- ``store_total_mb``: all arrays, including the float16 percentile grid kept for offline use;
- ``scorer_rss_mb``: resident memory added by loading the store and building the scorer;
- ``scores_per_second_per_core``: vectorised scoring in batches of 64, one thread (target >= 50,000);
- the same with every per-input result object built (what a server returns);
- ``single_request_ms`` p50/p99: one alpha vector scored and its result built.

Over gRPC (with ``--grpc-target``): p50/p99 latency of the gateway's ``Score`` RPC against
a server that has a store for ``--grpc-model`` loaded (target p99 <= 2 ms on loopback).

Usage::

    .venv/bin/python bench/sidecar_timing.py [--classes 1000 --filters 2048] [--grpc-target 127.0.0.1:50051 --grpc-model NAME]
"""

from __future__ import annotations

import os

# One core: the figure is per core, and the machine is shared.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration  # noqa: E402
from explainserve.anomaly.synthetic import SyntheticClasses  # noqa: E402

MB = 1e6


def resident_bytes() -> int:
    """Resident set size of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_synthetic_store(directory: Path, classes: int, filters: int, images_per_class: int,
                          held_out_per_class: int) -> tuple[SyntheticClasses, float]:
    """Build and calibrate a synthetic store; returns its generator and the build seconds."""
    synthetic = SyntheticClasses.random(classes, filters, seed=0)
    started = time.perf_counter()
    build_store(tqdm(synthetic.batches(images_per_class, batch_size=500), desc="training alpha",
                     total=-(-classes * images_per_class // 500), unit="batch"),
                directory, synthetic.meta, build_time="2026-01-01T00:00:00Z", progress=True)
    seconds = time.perf_counter() - started
    store = load_store(directory)
    held_out = np.repeat(np.arange(classes), held_out_per_class)
    save_calibration(store, calibrate(store, synthetic.sample(held_out, seed=9), held_out))
    return synthetic, seconds


def in_process(directory: Path, synthetic: SyntheticClasses, batches: int, requests: int) -> dict:
    """Load time, memory and scoring throughput of the in-process scorer."""
    before = resident_bytes()
    started = time.perf_counter()
    store = load_store(directory)
    scorer = Scorer(store)
    load_seconds = time.perf_counter() - started
    scorer_rss = resident_bytes() - before
    num_classes = store.num_classes
    rng = np.random.default_rng(1)
    classes = rng.integers(0, num_classes, size=(batches, 64))
    alphas = [synthetic.sample(row, seed=int(i)) for i, row in enumerate(classes)]
    first = scorer.score(alphas[0], classes[0])  # touch the pages once

    started = time.perf_counter()
    for alpha, row in zip(alphas, classes):
        scorer.score(alpha, row)
    vectorised = batches * 64 / (time.perf_counter() - started)
    started = time.perf_counter()
    for alpha, row in zip(alphas, classes):
        scorer.score(alpha, row).samples()
    with_objects = batches * 64 / (time.perf_counter() - started)

    latencies = []
    for index in range(requests):
        alpha = alphas[index % batches][index % 64]
        started = time.perf_counter()
        scorer.score(alpha, classes[index % batches, index % 64]).sample(0)
        latencies.append(time.perf_counter() - started)
    return {
        "store_serving_mb": store.serving_bytes() / MB,
        "store_total_mb": store.total_bytes() / MB,
        "scorer_rss_mb": scorer_rss / MB,
        "store_load_seconds_with_sha256": load_seconds,
        "scores_per_second_per_core": vectorised,
        "scores_per_second_per_core_with_result_objects": with_objects,
        "single_request_ms_p50": float(np.percentile(latencies, 50) * 1e3),
        "single_request_ms_p99": float(np.percentile(latencies, 99) * 1e3),
        "surprising_filters_per_input": float(first.surprise_count.mean()),
        "expected_missing_filters_per_input": float(first.expectation_count.mean()),
    }


def grpc_score_latency(target: str, model: str, num_filters: int, num_classes: int, requests: int = 2000) -> dict:
    """p50/p99 latency of the gateway's ``Score`` RPC at ``target`` (host:port), seconds -> ms.

    The server must have a distribution store for ``model`` with ``num_filters`` filters and
    ``num_classes`` classes loaded.
    """
    import grpc

    from explainserve._generated import explain_pb2, explain_pb2_grpc

    rng = np.random.default_rng(2)
    with grpc.insecure_channel(target) as channel:
        stub = explain_pb2_grpc.ExplainerStub(channel)
        requests_list = [
            explain_pb2.ScoreRequest(model=model, alpha=rng.gamma(2.0, 0.01, num_filters).astype(np.float32).tolist(),
                                     predicted_class=int(rng.integers(num_classes)))
            for _ in range(min(requests, 200))
        ]
        stub.Score(requests_list[0], timeout=10)  # connect and warm up
        latencies = []
        for index in range(requests):
            started = time.perf_counter()
            stub.Score(requests_list[index % len(requests_list)], timeout=10)
            latencies.append(time.perf_counter() - started)
    return {"grpc_score_ms_p50": float(np.percentile(latencies, 50) * 1e3),
            "grpc_score_ms_p99": float(np.percentile(latencies, 99) * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--filters", type=int, default=2048)
    parser.add_argument("--images-per-class", type=int, default=100, help="synthetic training images per class")
    parser.add_argument("--held-out-per-class", type=int, default=10, help="synthetic calibration images per class")
    parser.add_argument("--batches", type=int, default=200, help="batches of 64 timed")
    parser.add_argument("--requests", type=int, default=2000, help="single requests timed")
    parser.add_argument("--store", type=Path, help="reuse (or create) the synthetic store here")
    parser.add_argument("--grpc-target", help="also time the Score RPC of a running gateway, host:port")
    parser.add_argument("--grpc-model", default="synthetic", help="model name whose store the gateway holds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="explainserve-bench-") as scratch:
        directory = args.store or Path(scratch) / "store"
        if (directory / "manifest.json").exists():
            synthetic = SyntheticClasses.random(args.classes, args.filters, seed=0)
        else:
            synthetic, seconds = build_synthetic_store(directory, args.classes, args.filters,
                                                       args.images_per_class, args.held_out_per_class)
            print(f"store_build_seconds {seconds:.1f}  ({args.classes * args.images_per_class} training vectors)")
        figures = in_process(directory, synthetic, args.batches, args.requests)
    if args.grpc_target:
        figures.update(grpc_score_latency(args.grpc_target, args.grpc_model, args.filters, args.classes, args.requests))
    print(f"store: {args.classes} classes x {args.filters} filters")
    for name, value in figures.items():
        print(f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}")


if __name__ == "__main__":
    main()
