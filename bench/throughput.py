"""Throughput of SWAG_I+G through the Explain API at TorchServe batch sizes 1, 4 and 8.

Two models by default: a random-init ResNet-18 at 224x224, whose network pass dominates, and
the demo image model at 64x64, where the fixed cost of serving a request weighs most. For each,
one TorchServe holds one copy of the model per (batch size, maxBatchDelay) setting, each with
one worker; the gateway sits in front. For each setting, ``2 * batch size`` closed-loop
clients send distinct images for a fixed time through the gateway; the completed requests per
second and the p50 / p95 latency are recorded. Right after, the in-process library explains
batches of the same size (same images, same torch threads) for its own throughput.

Prints, and writes to ``bench/THROUGHPUT.md`` with a plot per model ``bench/throughput_<model>.png``:

- ``batching_speedup`` = best batched throughput / batch-1 throughput;
- ``efficiency[B]`` = served throughput / in-process throughput at batch size B (target >= 0.8);
- ``cpu_efficiency[B]`` = in-process CPU seconds per image / serving CPU seconds per request
  (TorchServe's frontend and worker plus the gateway; the clients are not counted);

and ends with ``efficiency_min=X``, the lowest ``efficiency`` over every model and setting
(targets: >= 0.8 for the demo model at batch 4 and 8, >= 0.9 for ResNet-18 at 224).

On a shared machine other work lowers the wall-clock figures, and not evenly across the
settings measured one after another; the CPU-time ratio is much less affected by it. The
load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torchvision
from tqdm import tqdm

from explainserve.client import ExplainClient, build_request
from explainserve.commands.archive import IMAGENET_MEAN, IMAGENET_STD, demo_model
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.model_archive import write_archive
from explainserve.sidecar.local import local_service

HERE = Path(__file__).resolve().parent
METHODS = ["swag_i_g"]
SETTINGS = ((1, 1), (4, 10), (4, 100), (8, 10), (8, 100))  # (batch size, maxBatchDelay ms)
EFFICIENCY_TARGET = 0.8


@dataclass
class Row:
    batch_size: int
    max_batch_delay_ms: int
    clients: int
    served_rps: float
    p50_s: float
    p95_s: float
    mean_batch: float  # TorchServe batch size seen by the requests, averaged
    library_rps: float
    served_cpu_s: float  # serving CPU seconds per request
    library_cpu_s: float  # in-process CPU seconds per image

    @property
    def efficiency(self) -> float:
        return self.served_rps / self.library_rps

    @property
    def cpu_efficiency(self) -> float:
        return self.library_cpu_s / self.served_cpu_s


def stand_in(side: int) -> tuple[torch.nn.Module, dict]:
    """A random-init ResNet-18 (8 classes): a model whose network pass dominates the serving cost."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8).eval()
    return model, {"name": "resnet18", "version": "1.0", "kind": "image", "input_size": [side, side],
                   "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "class_names": [f"class_{i}" for i in range(8)],
                   "layer": None, "architecture": {"factory": "torchvision.models.resnet18", "kwargs": {"num_classes": 8}},
                   "build_timestamp": time.time()}


def serving_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes and all their children."""
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def served_throughput(target: str, model: str, images: list[np.ndarray], clients: int, seconds: float,
                      serving_pids: list[int]):
    """Closed loop: ``clients`` threads, each with its own channel, for ``seconds``.
    Returns (requests/s, latencies s, batch sizes seen, serving CPU seconds per request)."""
    requests = [build_request(image, model=model, methods=METHODS) for image in images]
    latencies, batches, lock, stop = [], [], threading.Lock(), threading.Event()
    counting = threading.Event()

    def loop(index: int) -> None:
        with ExplainClient(target) as client:
            sequence = 0
            while not stop.is_set():
                started = time.perf_counter()
                result = client.send(requests[(index + sequence * clients) % len(requests)], timeout=600)
                elapsed = time.perf_counter() - started
                if counting.is_set() and not stop.is_set():
                    with lock:
                        latencies.append(elapsed)
                        batches.append(result.timings["batch_size"])
                sequence += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(min(10.0, seconds / 3))  # warm-up: fill the queue, let the worker reach steady state
    cpu_before = serving_cpu_seconds(serving_pids)
    counting.set()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    cpu = serving_cpu_seconds(serving_pids) - cpu_before  # includes the few calls still in flight
    for thread in threads:
        thread.join()
    return len(latencies) / elapsed, np.array(latencies), np.array(batches), cpu / max(len(latencies), 1)


def library_throughput(explainer: Explainer, images: list[np.ndarray], batch_size: int,
                       seconds: float) -> tuple[float, float]:
    """Images per second of ``explainer.explain`` on batches of ``batch_size`` distinct images,
    and CPU seconds (all threads of this process) per image."""
    batches = [images[i:i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
    explainer.explain(batches[0], METHODS, ExplainOptions())  # warm-up
    done, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        explainer.explain(batches[done % len(batches)], METHODS, ExplainOptions())
        done += 1
    images_done = done * batch_size
    return images_done / (time.perf_counter() - started), (time.process_time() - cpu_started) / images_done


def report_section(rows: list[Row], description: str, load: tuple[str, str], plot: Path) -> list[str]:
    """The Markdown lines of one model's table, and its plot written to ``plot``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(row for row in rows if row.batch_size == 1)
    best = max(rows, key=lambda row: row.served_rps)
    lines = [
        f"### {description}", "",
        f"Load average before / after: {load[0]} / {load[1]} (2 cores).", "",
        "| batch size | maxBatchDelay ms | clients | served req/s | p50 s | p95 s | mean batch | in-process img/s "
        "| efficiency | serving CPU s/req | in-process CPU s/img | CPU efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.batch_size} | {r.max_batch_delay_ms} | {r.clients} | {r.served_rps:.2f} | {r.p50_s:.2f} | "
              f"{r.p95_s:.2f} | {r.mean_batch:.2f} | {r.library_rps:.2f} | {r.efficiency:.2f} | "
              f"{r.served_cpu_s:.3f} | {r.library_cpu_s:.3f} | {r.cpu_efficiency:.2f} |" for r in rows]
    lines += ["", f"batching_speedup = {best.served_rps / base.served_rps:.2f} "
              f"(batch {best.batch_size}, {best.max_batch_delay_ms} ms, over batch 1); "
              f"efficiency target >= {EFFICIENCY_TARGET}: "
              + ", ".join(f"B={r.batch_size}/{r.max_batch_delay_ms}ms {r.efficiency:.2f}" for r in rows)
              + "; cpu_efficiency: " + ", ".join(f"B={r.batch_size}/{r.max_batch_delay_ms}ms {r.cpu_efficiency:.2f}"
                                                 for r in rows), "",
              f"![throughput]({plot.name})", ""]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for delay in sorted({r.max_batch_delay_ms for r in rows if r.batch_size > 1}):
        chosen = [base] + [r for r in rows if r.max_batch_delay_ms == delay and r.batch_size > 1]
        sizes = [r.batch_size for r in chosen]
        left.plot(sizes, [r.served_rps for r in chosen], "o-", label=f"served, {delay} ms delay")
        right.plot(sizes, [r.p95_s for r in chosen], "o-", label=f"{delay} ms delay")
    in_process = sorted({r.batch_size: r.library_rps for r in rows}.items())
    left.plot([b for b, _ in in_process], [v for _, v in in_process], "k--", label="in-process library")
    left.set(xlabel="TorchServe batch size", ylabel="requests / s", title="Throughput")
    right.set(xlabel="TorchServe batch size", ylabel="p95 latency (s)", title="p95 latency (2 x batch clients)")
    for axis in (left, right):
        axis.set_xticks([1, 4, 8])
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return lines


def measure(model: torch.nn.Module, metadata: dict, args) -> tuple[list[Row], tuple[str, str]]:
    """Served and in-process throughput of one model at every setting; rows and load averages."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*metadata["input_size"], 3), dtype=np.uint8) for _ in range(16)]
    explainer = Explainer(model, kind="image", input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"])
    load_before = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = {}
        for batch_size, delay in SETTINGS:
            names[batch_size, delay] = name = f"{metadata['name']}_b{batch_size}_d{delay}"
            write_archive(model, {**metadata, "name": name}, tmp / "store", batch_size=batch_size, max_batch_delay_ms=delay)
        threads = str(args.threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        # Every closed-loop client at work at once: the gateway's default admission cap (4 at work,
        # 4 waiting) would refuse the 16 clients of batch 8 as overload.
        most_clients = str(2 * max(batch_size for batch_size, _ in SETTINGS))
        with local_service(tmp / "store", list(names.values()), tmp, ready_timeout=600, env=env,
                           gateway_args=("--max-concurrent-requests", most_clients)) as (
                torchserve, gateway, listen):
            for batch_size, delay in tqdm(SETTINGS, desc=f"{metadata['name']} settings"):
                clients = 2 * batch_size
                rps, latencies, batches, served_cpu = served_throughput(
                    listen, names[batch_size, delay], images, clients, args.seconds,
                    [torchserve.process.pid, gateway.pid])
                library, library_cpu = library_throughput(explainer, images, batch_size, args.seconds / 2)
                rows.append(Row(batch_size, delay, clients, rps, float(np.percentile(latencies, 50)),
                                float(np.percentile(latencies, 95)), float(batches.mean()), library,
                                served_cpu, library_cpu))
                tqdm.write(f"B={batch_size} delay={delay} ms: served {rps:.2f} req/s, p95 {rows[-1].p95_s:.2f} s, "
                           f"in-process {library:.2f} img/s, efficiency {rows[-1].efficiency:.2f}, "
                           f"cpu_efficiency {rows[-1].cpu_efficiency:.2f}")
    return rows, (load_before, "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per setting")
    parser.add_argument("--models", nargs="+", choices=("demo", "resnet18"), default=["resnet18", "demo"],
                        help="the demo image model (64x64: serving overhead weighs most) and/or a random-init "
                             "ResNet-18 (--side: the network pass weighs most)")
    parser.add_argument("--side", type=int, default=224, help="input side of the ResNet-18")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in the worker and in-process")
    parser.add_argument("--out", type=Path, default=HERE / "THROUGHPUT.md")
    args = parser.parse_args()
    if args.seconds <= 0 or args.threads < 1 or not 32 <= args.side <= 1024:
        parser.error("--seconds must be positive, --threads at least 1, --side in [32, 1024]")
    torch.set_num_threads(args.threads)
    lines = ["## Throughput and batching (SWAG_I+G through the Explain API)", "",
             "Generated by `bench/throughput.py`: per model, one TorchServe with a copy of the model per "
             "setting and the gateway in front, 2 x batch size closed-loop clients, then the in-process "
             "library at the same batch size.", ""]
    efficiencies = []
    for choice in args.models:
        if choice == "demo":
            model, metadata = demo_model("image")
            description = f"Demo image model ({metadata['input_size'][0]}x{metadata['input_size'][1]})"
        else:
            model, metadata = stand_in(args.side)
            description = f"Random-init ResNet-18 ({args.side}x{args.side})"
        rows, load = measure(model, metadata, args)
        efficiencies += [row.efficiency for row in rows]
        plot = args.out.with_name(f"throughput_{choice}.png")
        lines += report_section(rows, description, load, plot)
    text = "\n".join(lines)
    args.out.write_text(text)
    print(text)
    print(f"efficiency_min={min(efficiencies):.3f}")


if __name__ == "__main__":
    main()
