"""Anomaly scoring speed and memory with a synthetic 1000-class x 2048-filter store.

In-process: builds the store with the real builder, calibrates it, and prints

- ``store_serving_mb``: arrays the scorer reads (mean, P0.1, P99.9, exemplars, β grid);
- ``store_total_mb``: all arrays, including the float16 percentile grid kept for offline use;
- ``scorer_rss_mb``: resident memory added by loading the store and building the scorer;
- ``scores_per_second_per_core``: vectorised scoring in batches of 64, one thread (target >= 50,000);
- ``scores_per_cpu_second``: the same scores over the CPU time this process spent on them
  (``time.process_time``), which a loaded machine's waits for a core do not lower;
- the same with the 32 most extreme flags of each kind as (B, 32) arrays (``top_flags``, what a
  columnar answer carries at most);
- the same with every per-input result object built (what a server returns);
- ``single_request_ms`` p50/p99: one alpha vector scored and its result built.

With ``--features`` the store is calibrated with synthetic pooled features too (the feature
block, :mod:`explainserve.anomaly.feature_tests`), and it also prints ``feature_block_serving_bytes``
(the block's arrays the scorer reads) and ``scores_per_second_per_core_with_features`` /
``scores_per_cpu_second_with_features``: the same batches scored with their features (the
five-test verdict). ``--no-grpc`` stops after the in-process figures.

Where the time of a per-message ``ScoreBatch`` of 256 goes, in-process (``score_batch_stage_ms_*``):
the client building its ScoreRequests, serialising and parsing the request, reading the
vectors out of the parsed messages, the scoring, and building the 256 ClassVerdicts.

Over gRPC: starts a gateway (``explainserve sidecar --store-dir DIR`` on free loopback ports,
``DIR/synthetic/`` being the same store; no TorchServe, which scoring does not need for a model
with a store), waits until its ``anomaly`` health is SERVING, and prints

- ``gateway_rss_mb_after_store_load``: the gateway process's resident memory once the store is
  loaded and verified (and again after the timing);
- ``grpc_health_check_ms`` and ``grpc_score_ms`` p50/p99: a no-op health check (the floor the
  Python gRPC stack and the machine set for any unary call) and a unary ``Score``, called in
  turn after a warm-up, so that both see the same load; ``score_vs_health_p99_ratio`` is the
  ratio of their p99s (target <= 1.25);
- ``grpc_score_batch_messages_ms`` p50/p99 per per-message ``ScoreBatch`` call of 256, and the
  scores per second it gives;
- ``grpc_score_columns_ms`` p50/p99 per columnar ``ScoreColumns`` call of 256 and
  ``grpc_score_batch_scores_per_second``, the scores per second of those sequential calls
  (the bulk form: target >= 50,000);
- ``grpc_score_stream_scores_per_second``: one ``ScoreStream`` of messages of 256 (a client
  of an offline job; sending, scoring and receiving overlap);
- the floor the machine sets for a sequential ``ScoreColumns``: ``grpc_echo_columns_request_ms``
  p50/p99, a unary call carrying the same request bytes to a bare Python gRPC server (a
  subprocess answering with an empty message; no parsing, no scoring), timed in turn with the
  ``ScoreColumns`` calls; ``score_columns_in_process_ms_p50``, the gateway's work on one parsed
  request (``score_columns``: reading, scoring, the answer); and
  ``grpc_score_columns_floor_scores_per_second``, 256 over the sum of the two p50s: what
  sequential calls would reach if the gateway added nothing to them.

Client and gateway share the machine's cores.
The gateway is stopped (SIGTERM, SIGKILL after 10 s) whatever happens. ``--grpc-target`` times a
running gateway instead, one with a store for ``--grpc-model`` of the same size.

Usage::

    .venv/bin/python bench/sidecar_timing.py [--classes 1000 --filters 2048] [--grpc-target 127.0.0.1:50051 --grpc-model NAME]
"""

from __future__ import annotations

import os

# One core: the figure is per core, and the machine is shared.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from explainserve.anomaly import MAX_FLAGS, Scorer, build_store, calibrate, load_store, save_calibration  # noqa: E402
from explainserve.anomaly.store import FEATURE_SPECS  # noqa: E402
from explainserve.anomaly.synthetic import SyntheticClasses  # noqa: E402
from explainserve.anomaly.top_flags import top_flags  # noqa: E402
from explainserve.sidecar.local import start_gateway, stop_gateway, wait_serving  # noqa: E402
from explainserve.sidecar.torchserve import free_port, log_tail  # noqa: E402

MB = 1e6
BULK = 256  # vectors per bulk message over gRPC


def resident_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def build_synthetic_store(directory: Path, classes: int, filters: int, images_per_class: int,
                          held_out_per_class: int, features: bool = False) -> tuple[SyntheticClasses, float]:
    """Build and calibrate a synthetic store (with the feature block when ``features``);
    returns its generator and the build seconds."""
    synthetic = SyntheticClasses.random(classes, filters, seed=0)
    started = time.perf_counter()
    build_store(tqdm(synthetic.batches(images_per_class, batch_size=500), desc="training alpha",
                     total=-(-classes * images_per_class // 500), unit="batch"),
                directory, synthetic.meta, build_time="2026-01-01T00:00:00Z", progress=True)
    seconds = time.perf_counter() - started
    store = load_store(directory)
    held_out = np.repeat(np.arange(classes), held_out_per_class)
    pooled = synthetic.features(held_out, seed=10) if features else None
    save_calibration(store, calibrate(store, synthetic.sample(held_out, seed=9), held_out, features=pooled))
    return synthetic, seconds


def call_seconds(call, count: int) -> list[float]:
    """Wall-clock seconds of ``call(index)`` for index 0 .. count - 1, one after another."""
    seconds = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        seconds.append(time.perf_counter() - started)
    return seconds


def percentiles_ms(seconds: list[float], prefix: str) -> dict:
    return {f"{prefix}_ms_p50": float(np.percentile(seconds, 50) * 1e3),
            f"{prefix}_ms_p99": float(np.percentile(seconds, 99) * 1e3)}


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

    started, cpu_started = time.perf_counter(), time.process_time()
    for alpha, row in zip(alphas, classes):
        scorer.score(alpha, row)
    vectorised = batches * 64 / (time.perf_counter() - started)
    per_cpu_second = batches * 64 / (time.process_time() - cpu_started)
    started = time.perf_counter()
    for alpha, row in zip(alphas, classes):
        top_flags(scorer.score(alpha, row), MAX_FLAGS)
    with_top_flags = batches * 64 / (time.perf_counter() - started)
    started = time.perf_counter()
    for alpha, row in zip(alphas, classes):
        scorer.score(alpha, row).samples()
    with_objects = batches * 64 / (time.perf_counter() - started)

    with_features = {}
    if scorer.has_feature_tests:
        features = [synthetic.features(row, seed=1000 + int(i)) for i, row in enumerate(classes)]
        started, cpu_started = time.perf_counter(), time.process_time()
        for alpha, row, pooled in zip(alphas, classes, features):
            scorer.score(alpha, row, pooled)
        with_features = {
            "feature_block_serving_bytes": sum(store.arrays[name].nbytes for name in FEATURE_SPECS),
            "scores_per_second_per_core_with_features": batches * 64 / (time.perf_counter() - started),
            "scores_per_cpu_second_with_features": batches * 64 / (time.process_time() - cpu_started),
        }

    latencies = call_seconds(
        lambda index: scorer.score(alphas[index % batches][index % 64], classes[index % batches, index % 64]).sample(0),
        requests)
    return {
        "store_serving_mb": store.serving_bytes() / MB,
        "store_total_mb": store.total_bytes() / MB,
        "scorer_rss_mb": scorer_rss / MB,
        "store_load_seconds_with_sha256": load_seconds,
        "scores_per_second_per_core": vectorised,
        "scores_per_cpu_second": per_cpu_second,
        "scores_per_second_per_core_with_top_flags": with_top_flags,
        "scores_per_second_per_core_with_result_objects": with_objects,
        **percentiles_ms(latencies, "single_request"),
        "surprising_filters_per_input": float(first.surprise_count.mean()),
        "expected_missing_filters_per_input": float(first.expectation_count.mean()),
        **with_features,
    }


def score_batch_stages(directory: Path, synthetic: SyntheticClasses, repeats: int = 5) -> dict:
    """Milliseconds of each stage of a per-message ScoreBatch of ``BULK`` vectors, in-process
    (the median of ``repeats``)."""
    from explainserve._generated import explain_pb2
    from explainserve.sidecar.scoring import class_verdict

    scorer = Scorer(load_store(directory))
    classes = np.random.default_rng(3).integers(0, synthetic.loc.shape[0], size=BULK)
    alpha = synthetic.sample(classes, seed=7)
    stages = {
        "client_build": lambda: explain_pb2.ScoreBatchRequest(requests=[
            explain_pb2.ScoreRequest(model="synthetic", alpha=row.tolist(), predicted_class=int(c))
            for row, c in zip(alpha, classes)]),
    }
    request = stages["client_build"]()
    data = request.SerializeToString()
    parsed = explain_pb2.ScoreBatchRequest.FromString(data)
    scores = scorer.score(alpha, classes)
    stages.update({
        "serialise": request.SerializeToString,
        "parse": lambda: explain_pb2.ScoreBatchRequest.FromString(data),
        "read_vectors": lambda: np.asarray([r.alpha for r in parsed.requests], dtype=np.float32),
        "score": lambda: scorer.score(alpha, classes),
        "verdict_messages": lambda: [class_verdict(scores, row) for row in range(BULK)],
    })
    return {f"score_batch_stage_ms_{name}": float(np.median(call_seconds(lambda _: stage(), repeats)) * 1e3)
            for name, stage in stages.items()}


def column_batches(synthetic: SyntheticClasses) -> tuple[np.ndarray, list[np.ndarray]]:
    """(10, BULK) class ids and their 10 (BULK, K) alpha batches: the bulk calls' inputs, cycled."""
    classes = np.random.default_rng(2).integers(0, synthetic.loc.shape[0], size=(10, BULK))
    return classes, [synthetic.sample(row, seed=100 + i) for i, row in enumerate(classes)]


def column_requests(classes: np.ndarray, alphas: list[np.ndarray], model: str) -> list:
    """The ScoreColumnsRequests of :func:`column_batches`' ``classes`` and ``alphas`` for ``model``."""
    from explainserve.client import columns_request

    return [columns_request(alpha_rows, row, model=model) for alpha_rows, row in zip(alphas, classes)]


def grpc_score_latency(target: str, model: str, synthetic: SyntheticClasses, requests: int, batches: int,
                       warm_up: int = 200) -> dict:
    """Latency of the gateway's ``Score`` against its health check (called in turn after
    ``warm_up`` calls), and the throughput of per-message ``ScoreBatch``, columnar
    ``ScoreColumns`` and ``ScoreStream`` with ``BULK`` vectors per message, at ``target``
    (host:port), whose store for ``model`` is ``synthetic``'s."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from explainserve._generated import explain_pb2, explain_pb2_grpc
    from explainserve.wire import MAX_MESSAGE_BYTES

    classes, alphas = column_batches(synthetic)
    singles = [explain_pb2.ScoreRequest(model=model, alpha=alpha.tolist(), predicted_class=int(class_id))
               for alpha, class_id in zip(alphas[0][:256], classes[0][:256])]
    batch_requests = [explain_pb2.ScoreBatchRequest(requests=[
        explain_pb2.ScoreRequest(model=model, alpha=alpha.tolist(), predicted_class=int(class_id))
        for alpha, class_id in zip(alpha_rows, row)]) for alpha_rows, row in zip(alphas, classes)]
    columns = column_requests(classes, alphas, model)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = explain_pb2_grpc.ExplainerStub(channel)
        for index in range(warm_up):  # connect, and warm both sides up
            stub.Score(singles[index % len(singles)], timeout=10)
        # The floor of a unary call on this machine: the gateway's health check does no work.
        health_stub, health_request = health_pb2_grpc.HealthStub(channel), health_pb2.HealthCheckRequest(service="anomaly")
        floor, single = [], []
        for index in range(requests):
            floor += call_seconds(lambda _: health_stub.Check(health_request, timeout=10), 1)
            single += call_seconds(lambda _: stub.Score(singles[index % len(singles)], timeout=10), 1)
        bulk = {}
        for request in batch_requests[:3]:
            stub.ScoreBatch(request, timeout=60)
        bulk["batch_messages"] = call_seconds(
            lambda index: stub.ScoreBatch(batch_requests[index % len(batch_requests)], timeout=60), batches)
        column_bytes = [request.SerializeToString() for request in columns]
        with echo_server() as echo_target, grpc.insecure_channel(echo_target, options=options) as echo_channel:
            echo = echo_channel.unary_unary(ECHO_METHOD)
            for index in range(3):
                stub.ScoreColumns(columns[index], timeout=60)
                echo(column_bytes[index], timeout=60)
            bulk["columns"], bulk["echo"] = [], []
            for index in range(batches):  # in turn, so that both see the same load
                bulk["columns"] += call_seconds(lambda _: stub.ScoreColumns(columns[index % len(columns)], timeout=60), 1)
                bulk["echo"] += call_seconds(lambda _: echo(column_bytes[index % len(columns)], timeout=60), 1)
        started = time.perf_counter()
        answers = sum(1 for _ in stub.ScoreStream((columns[i % len(columns)] for i in range(batches)),
                                                  timeout=600))
        stream_seconds = time.perf_counter() - started
    if answers != batches:
        raise RuntimeError(f"ScoreStream answered {answers} of {batches} messages")
    figures = {**percentiles_ms(floor, "grpc_health_check"), **percentiles_ms(single, "grpc_score")}
    figures["score_vs_health_p99_ratio"] = figures["grpc_score_ms_p99"] / figures["grpc_health_check_ms_p99"]
    figures.update(percentiles_ms(bulk["batch_messages"], "grpc_score_batch_messages"))
    figures["grpc_score_batch_messages_scores_per_second"] = BULK * batches / sum(bulk["batch_messages"])
    figures.update(percentiles_ms(bulk["columns"], "grpc_score_columns"))
    figures["grpc_score_batch_scores_per_second"] = BULK * batches / sum(bulk["columns"])
    figures["grpc_score_stream_scores_per_second"] = BULK * batches / stream_seconds
    figures.update(percentiles_ms(bulk["echo"], "grpc_echo_columns_request"))
    return figures


ECHO_METHOD = "/bench.Echo/Call"


def serve_echo() -> None:
    """A bare gRPC server (the gateway's message limits, grpc.aio like the gateway) answering every
    ECHO_METHOD call with an empty message; prints its port, serves until killed."""
    import asyncio

    import grpc

    from explainserve.wire import MAX_MESSAGE_BYTES

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        service, _, method = ECHO_METHOD[1:].partition("/")

        async def answer(request: bytes, context) -> bytes:
            return b""

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(answer)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


@contextmanager
def echo_server():
    """The target of a :func:`serve_echo` subprocess, killed on leaving."""
    import subprocess

    process = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"echo server did not start (printed {port!r}, exit code {process.poll()})")
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def score_columns_in_process_ms(directory: Path, synthetic: SyntheticClasses, repeats: int = 20) -> float:
    """Median milliseconds of the gateway's work on one parsed ``ScoreColumns`` request of
    ``BULK`` rows (:func:`~explainserve.sidecar.columns.score_columns`: reading the tensor,
    scoring, building the answer), in this process, on the store at ``directory``."""
    from explainserve._generated import explain_pb2
    from explainserve.sidecar.columns import score_columns

    scorer = Scorer(load_store(directory))
    requests = [explain_pb2.ScoreColumnsRequest.FromString(request.SerializeToString())
                for request in column_requests(*column_batches(synthetic), synthetic.meta.model_name)]
    score_columns(scorer, requests[0])
    seconds = call_seconds(lambda index: score_columns(scorer, requests[index % len(requests)]), repeats)
    return float(np.median(seconds) * 1e3)


def grpc_with_gateway(store: Path, scratch: Path, synthetic: SyntheticClasses, requests: int, batches: int) -> dict:
    """Start a gateway with ``store`` as its only distribution store, time it, always stop it."""
    model = synthetic.meta.model_name
    store_dir = scratch / "gateway_stores"
    store_dir.mkdir()
    (store_dir / model).symlink_to(store.resolve(), target_is_directory=True)  # DIR/<model name>/
    nowhere = f"127.0.0.1:{free_port()}"  # no TorchServe: Score needs none for a model with a store
    gateway, target, _ = start_gateway(scratch, nowhere, nowhere, poll_interval=30.0,
                                       extra_args=("--store-dir", str(store_dir)))
    try:
        started = time.perf_counter()
        wait_serving(target, timeout=300, process=gateway, service="anomaly")
        figures = {"gateway_start_seconds": time.perf_counter() - started,
                   "gateway_rss_mb_after_store_load": resident_bytes(gateway.pid) / MB}
        figures.update(grpc_score_latency(target, model, synthetic, requests, batches))
        figures["gateway_rss_mb_after_timing"] = resident_bytes(gateway.pid) / MB
    except BaseException:
        print("==> gateway.log <==", log_tail(scratch / "gateway.log", 40), sep="\n", file=sys.stderr)
        raise
    finally:
        stop_gateway(gateway)
    figures["gateway_exit_code"] = gateway.returncode
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--filters", type=int, default=2048)
    parser.add_argument("--images-per-class", type=int, default=100, help="synthetic training images per class")
    parser.add_argument("--held-out-per-class", type=int, default=10, help="synthetic calibration images per class")
    parser.add_argument("--batches", type=int, default=200, help="batches timed (of 64 in-process, of 256 over gRPC)")
    parser.add_argument("--requests", type=int, default=2000, help="single requests timed")
    parser.add_argument("--store", type=Path, help="reuse (or create) the synthetic store here")
    parser.add_argument("--grpc-target", help="time this running gateway (host:port) instead of starting one")
    parser.add_argument("--grpc-model", default="synthetic", help="with --grpc-target: the model whose store it holds")
    parser.add_argument("--features", action="store_true",
                        help="calibrate a new store with synthetic pooled features and time scoring with them")
    parser.add_argument("--no-grpc", action="store_true", help="in-process figures only")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # echo_server()'s subprocess
    args = parser.parse_args()
    if args.echo_server:
        return serve_echo()

    print(f"load_average_at_start={load_average()}")
    with tempfile.TemporaryDirectory(prefix="explainserve-bench-") as scratch:
        scratch = Path(scratch)
        directory = args.store or scratch / "store"
        if (directory / "manifest.json").exists():
            synthetic = SyntheticClasses.random(args.classes, args.filters, seed=0)
        else:
            synthetic, seconds = build_synthetic_store(directory, args.classes, args.filters,
                                                       args.images_per_class, args.held_out_per_class, args.features)
            print(f"store_build_seconds={seconds:.1f}  ({args.classes * args.images_per_class} training vectors)")
        figures = in_process(directory, synthetic, args.batches, args.requests)
        figures.update(score_batch_stages(directory, synthetic))
        if args.no_grpc:
            pass
        elif args.grpc_target:
            figures.update(grpc_score_latency(args.grpc_target, args.grpc_model, synthetic, args.requests, args.batches))
        else:
            figures.update(grpc_with_gateway(directory, scratch, synthetic, args.requests, args.batches))
        if not args.no_grpc:
            figures["score_columns_in_process_ms_p50"] = score_columns_in_process_ms(directory, synthetic)
            figures["grpc_score_columns_floor_scores_per_second"] = BULK * 1e3 / (
                figures["grpc_echo_columns_request_ms_p50"] + figures["score_columns_in_process_ms_p50"])
    print(f"store: {args.classes} classes x {args.filters} filters")
    for name, value in figures.items():
        print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}")
    print(f"load_average_at_end={load_average()}")


if __name__ == "__main__":
    main()
