"""Latency through the Explain API versus the in-process library and a direct TorchServe call.

Starts TorchServe and the gateway on free loopback ports with ResNet-50 (random init, 224x224)
and, when its weights exist, the demo image model; then for each model measures p50 / p95 of:
prediction only, SWAG_I+G and Jitter-CAM through Explain; the same SWAG_I+G in-process; and
the same SWAG_I+G request sent straight to TorchServe's Predictions (the gateway's own cost).
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
from explainserve.commands.serve import start_gateway, wait_serving
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.model_archive import write_archive
from explainserve.sidecar.torchserve import TorchServe, TorchServeConfig, free_port
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


def percentiles(call, repeats: int, label: str) -> tuple[float, float]:
    call()  # warm-up
    seconds = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95))


def measure(name, model, metadata, explain_client, torchserve_stub, repeats, jitter_repeats):
    side = metadata["input_size"]
    image = np.random.default_rng(0).integers(0, 256, (*side, 3), dtype=np.uint8)
    explainer = Explainer(model, kind="image", input_size=side, mean=metadata["mean"], std=metadata["std"],
                          class_names=metadata["class_names"], layer=metadata["layer"])
    forwarded = inference_pb2.PredictionsRequest(model_name=name, input={
        HANDLER_REQUEST_KEY: build_request(image, model=name, methods=["swag_i_g"]).SerializeToString()})
    rows = {
        "explain predict": percentiles(lambda: explain_client.explain(image, model=name, timeout=600), repeats, "predict"),
        "explain swag_i_g": percentiles(lambda: explain_client.explain(image, model=name, methods=["swag_i_g"],
                                                                       timeout=600), repeats, "swag_i_g"),
        "in-process swag_i_g": percentiles(lambda: explainer.explain([image], ["swag_i_g"], ExplainOptions()),
                                           repeats, "in-process"),
        "torchserve swag_i_g": percentiles(lambda: torchserve_stub.Predictions(forwarded, timeout=600), repeats,
                                           "torchserve"),
        "explain jitter_cam": percentiles(lambda: explain_client.explain(image, model=name, methods=["jitter_cam"],
                                                                         timeout=600), jitter_repeats, "jitter_cam"),
    }
    print(f"\n{name} ({side[0]}x{side[1]}), seconds over {repeats} calls (Jitter-CAM {jitter_repeats}):")
    for row, (p50, p95) in rows.items():
        print(f"  {row:22s} p50 {p50:7.3f}  p95 {p95:7.3f}")
    ratio = rows["explain swag_i_g"][0] / rows["in-process swag_i_g"][0]
    gateway_ratio = rows["explain swag_i_g"][0] / rows["torchserve swag_i_g"][0]
    print(f"  grpc_overhead_ratio[{name}] = {ratio:.3f}   (Explain / direct TorchServe = {gateway_ratio:.3f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jitter-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = [resnet50()]
    try:
        models.append(demo_model("image"))
    except FileNotFoundError as missing:
        print(f"skipping the demo image model: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model, metadata in models:
            write_archive(model, metadata, tmp / "store", batch_size=1, max_batch_delay_ms=1)
        torchserve = TorchServe(TorchServeConfig(
            model_store=tmp / "store", models={m["name"]: f"{m['name']}.mar" for _, m in models}, workdir=tmp / "ts",
            grpc_inference_port=0, grpc_management_port=0, disable_token_auth=True)).start()
        gateway = None
        try:
            torchserve.wait_ready(timeout=300)
            listen = f"127.0.0.1:{free_port()}"
            gateway = start_gateway(listen, torchserve, free_port(), tmp / "gateway.log")
            wait_serving(listen, timeout=60, process=gateway)
            with ExplainClient(listen) as client, grpc.insecure_channel(torchserve.grpc_target, options=[
                    ("grpc.max_receive_message_length", 64 << 20)]) as channel:
                stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
                ratios = {m["name"]: measure(m["name"], model, m, client, stub, args.repeats, args.jitter_repeats)
                          for model, m in models}
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(10)
            torchserve.stop()
    print(f"\ngrpc_overhead_ratio = {ratios['resnet50']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
