"""Latency through the Explain API versus the in-process library and a direct TorchServe call.

Starts TorchServe and the gateway on free loopback ports with ResNet-50 (random init, 224x224)
and, when its weights exist, the demo image model; then for each model measures p50 / p95 of:
prediction only, SWAG_I+G and Jitter-CAM through Explain; the same SWAG_I+G and Jitter-CAM
in-process; and the same SWAG_I+G request sent straight to TorchServe's Predictions (the
gateway's own cost).
Prints ``grpc_overhead_ratio`` = Explain SWAG_I+G p50 / in-process SWAG_I+G p50.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
import torchvision
from tqdm import tqdm

from explainserve.client import ExplainClient, build_request
from explainserve.commands.archive import IMAGENET_MEAN, IMAGENET_STD, demo_model
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.model_archive import write_archive
from explainserve.sidecar.local import local_service
from explainserve.wire import HANDLER_REQUEST_KEY
from explainserve._generated import inference_pb2, inference_pb2_grpc


def resnet50() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).eval()
    return model, {"name": "resnet50", "version": "1.0", "kind": "image", "input_size": [224, 224],
                   "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                   "class_names": [f"class_{i}" for i in range(1000)], "layer": None,
                   "architecture": {"factory": "torchvision.models.resnet50", "kwargs": {"num_classes": 1000}},
                   "build_timestamp": time.time()}


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def interleaved(calls: dict, repeats: int, label: str) -> dict[str, tuple[float, float]]:
    """p50 and p95 seconds of each call; rounds time every call once, in rotating order, so
    that load from elsewhere on a shared machine falls on all of them alike."""
    for call in calls.values():
        call()  # warm-up
    names, seconds = list(calls), {name: [] for name in calls}
    for round_index in tqdm(range(repeats), desc=label, leave=False):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(calls[name]))
    return {name: (float(np.percentile(values, 50)), float(np.percentile(values, 95)))
            for name, values in seconds.items()}


def measure(name, model, metadata, explain_client, torchserve_stub, repeats, jitter_repeats):
    side = metadata["input_size"]
    image = np.random.default_rng(0).integers(0, 256, (*side, 3), dtype=np.uint8)
    explainer = Explainer(model, kind="image", input_size=side, mean=metadata["mean"], std=metadata["std"],
                          class_names=metadata["class_names"], layer=metadata["layer"])
    forwarded = inference_pb2.PredictionsRequest(model_name=name, input={
        HANDLER_REQUEST_KEY: build_request(image, model=name, methods=["swag_i_g"]).SerializeToString()})

    served = []  # per-call stage timings of every Explain call

    def explain(*methods):
        return lambda: served.append(explain_client.explain(image, model=name, methods=list(methods), timeout=600).timings)

    rows = interleaved({
        "explain predict": explain(),
        "explain swag_i_g": explain("swag_i_g"),
        "in-process swag_i_g": lambda: explainer.explain([image], ["swag_i_g"], ExplainOptions()),
        "torchserve swag_i_g": lambda: torchserve_stub.Predictions(forwarded, timeout=600),
    }, repeats, name)
    rows |= interleaved({
        "explain jitter_cam": explain("jitter_cam"),
        "in-process jitter_cam": lambda: explainer.explain([image], ["jitter_cam"], ExplainOptions()),
    }, jitter_repeats, f"{name} jitter_cam")
    print(f"\n{name} ({side[0]}x{side[1]}), seconds over {repeats} rounds (Jitter-CAM {jitter_repeats}):")
    for row, (p50, p95) in rows.items():
        print(f"  {row:22s} p50 {p50:7.3f}  p95 {p95:7.3f}")
    ratio = rows["explain swag_i_g"][0] / rows["in-process swag_i_g"][0]
    gateway_ratio = rows["explain swag_i_g"][0] / rows["torchserve swag_i_g"][0]
    print(f"  grpc_overhead_ratio[{name}] = {ratio:.3f}   (Explain / direct TorchServe = {gateway_ratio:.3f})")
    # Within one call, other load on the machine slows the handler and the rest alike, so this
    # ratio is steadier than the wall-clock one on a shared machine.
    per_call = np.median([t["total"] / t["handler"] for t in served if t.get("handler")])
    print(f"  per-call serving overhead (total / handler time, median) = {per_call:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jitter-repeats", type=int, default=2)
    parser.add_argument("--demo-weights-dir", type=Path, help="folder of the demo weights (default: the package's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = [resnet50()]
    try:
        models.append(demo_model("image", weights_dir=args.demo_weights_dir))
    except FileNotFoundError as missing:
        print(f"skipping the demo image model: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model, metadata in models:
            write_archive(model, metadata, tmp / "store", batch_size=1, max_batch_delay_ms=1)
        with local_service(tmp / "store", [m["name"] for _, m in models], tmp) as (torchserve, _, listen), \
                ExplainClient(listen) as client, \
                grpc.insecure_channel(torchserve.grpc_target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            ratios = {m["name"]: measure(m["name"], model, m, client, stub, args.repeats, args.jitter_repeats)
                      for model, m in models}
    print(f"\ngrpc_overhead_ratio = {ratios['resnet50']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
