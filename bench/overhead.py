"""Where the CPU of one served Explain goes: the demo image model, SWAG_I+G, batch size 1.

Two measurements, one torch thread everywhere (so CPU seconds add up per request):

1. **Stages, in-process.** The functions each stage of the served path runs, on the same image,
   timed with this process's CPU clock (median of ``--repeats``):
   ``client_encode`` (build_request + serialise), ``gateway_parse_validate`` (parse the request,
   check_request against describe()), ``gateway_forward`` (the PredictionsRequest to TorchServe,
   serialised), ``handler_decode`` (the handler's parse: the ExplainRequest and the PNG),
   ``preprocess``, ``probe`` (the network pass with the guided input gradient), ``slic`` (the
   SWAG_I+G superpixels of that gradient), ``map_encode`` (the handler's HandlerResponse, serialised),
   ``gateway_response`` (parse it, fill the ExplainResponse, serialise; no distribution store,
   as in the served run) and
   ``client_decode`` (parse + ExplainResult).
2. **Served.** ``--requests`` sequential Explain calls through a real TorchServe and gateway;
   CPU seconds per request of each process: the client (this process), the gateway, TorchServe's
   frontend (the JVM) and its worker (the Python handler process).

Prints ``stage_cpu_ms_<stage>=X``, ``served_cpu_ms_<process>=X``, ``served_cpu_ms_total``,
``library_cpu_ms`` (``Explainer.explain`` alone) and ``overhead_fraction`` = 1 - library / served
total (the share of a served request's CPU that is not the explanation itself). The load
average is printed before and after: other work on the machine inflates every figure.

Usage::

    .venv/bin/python bench/overhead.py [--requests 200 --repeats 50]
"""

from __future__ import annotations

import os

for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[variable] = "1"  # one thread per process: CPU seconds per request add up

import argparse  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from explainserve._generated import explain_pb2, handler_pb2, inference_pb2  # noqa: E402
from explainserve.client import ExplainClient, ExplainResult, build_request  # noqa: E402
from explainserve.commands.archive import demo_model  # noqa: E402
from explainserve.explainer import ExplainOptions, Explainer  # noqa: E402
from explainserve.model_archive import write_archive  # noqa: E402
from explainserve.probe import probe  # noqa: E402
from explainserve.superpixels import gradient_slic  # noqa: E402
from explainserve.swag import pixel_scores  # noqa: E402
from explainserve.sidecar.local import local_service  # noqa: E402
from explainserve.sidecar.metrics import GatewayMetrics  # noqa: E402
from explainserve.sidecar.pipeline import ExplainPipeline  # noqa: E402
from explainserve.sidecar.scoring import AnomalyScoring  # noqa: E402
from explainserve.sidecar.validation import check_request  # noqa: E402
from explainserve.wire import DEADLINE_KEY, HANDLER_REQUEST_KEY, deadline_entry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["swag_i_g"]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def cpu_ms(call, repeats: int) -> float:
    """Median CPU milliseconds of this process for ``call()``."""
    call()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        call()
        times.append(time.process_time() - started)
    return float(np.median(times) * 1e3)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_handler(model, metadata):
    """The served handler class, with the model loaded as ``initialize`` would."""
    sys.path.insert(0, str(ROOT / "handlers"))
    from image_handler import ImageHandler

    handler = ImageHandler()
    handler.metadata = metadata
    handler.explainer = Explainer(model, kind="image", input_size=metadata["input_size"], mean=metadata["mean"],
                                  std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"])
    handler.test_delay = 0.0
    return handler


def stages(model, metadata, image: bytes, repeats: int) -> tuple[dict, float]:
    """CPU milliseconds of each stage of the served path, in-process."""
    handler = image_handler(model, metadata)
    explainer = handler.explainer
    describe = {**handler.describe(), "kind": "image", "input_size": metadata["input_size"]}
    pipeline = ExplainPipeline(None, None, AnomalyScoring(GatewayMetrics()))  # no store, as served below

    request = build_request(image, model=metadata["name"], methods=METHODS)
    data = request.SerializeToString()
    item = {HANDLER_REQUEST_KEY: data}
    parsed = handler.parse(item)
    figures = {}
    figures["client_encode"] = cpu_ms(lambda: build_request(image, model=metadata["name"], methods=METHODS)
                                      .SerializeToString(), repeats)

    def parse_validate():
        check_request(explain_pb2.ExplainRequest.FromString(data), describe)

    figures["gateway_parse_validate"] = cpu_ms(parse_validate, repeats)
    figures["gateway_forward"] = cpu_ms(lambda: inference_pb2.PredictionsRequest(
        model_name=request.model, input={HANDLER_REQUEST_KEY: request.SerializeToString(),
                                         DEADLINE_KEY: deadline_entry(60)}).SerializeToString(), repeats)
    figures["handler_decode"] = cpu_ms(lambda: handler.parse(item), repeats)

    prepared = explainer.prepare([parsed.sample])
    figures["preprocess"] = cpu_ms(lambda: explainer.prepare([parsed.sample]), repeats)
    figures["probe"] = cpu_ms(lambda: probe(model, prepared.inputs, layer=explainer.layer, target=[None],
                                            input_gradient=True), repeats)
    probed = probe(model, prepared.inputs, layer=explainer.layer, target=[None], input_gradient=True)
    gradient = pixel_scores(probed, prepared.inputs, "guided")[0]
    slic_options = explainer.slic_options(ExplainOptions())
    figures["slic"] = cpu_ms(lambda: gradient_slic(prepared.images[0], gradient, variant="i_g", **slic_options), repeats)
    (result,) = explainer.explain([parsed.sample], METHODS, ExplainOptions())
    answer = handler.encode(parsed, result, batch_size=1, handler_seconds=0.1)
    figures["map_encode"] = cpu_ms(lambda: handler.encode(parsed, result, batch_size=1, handler_seconds=0.1), repeats)

    def gateway_response():
        handled = handler_pb2.HandlerResponse.FromString(answer)
        handled.response.anomaly.CopyFrom(pipeline.score(request, handled))
        return handled.response.SerializeToString()

    response = gateway_response()
    figures["gateway_response"] = cpu_ms(gateway_response, repeats)
    figures["client_decode"] = cpu_ms(
        lambda: ExplainResult.from_response(explain_pb2.ExplainResponse.FromString(response)), repeats)
    library = cpu_ms(lambda: explainer.explain([parsed.sample], METHODS, ExplainOptions()), repeats)
    return figures, library


def process_cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def served(model, metadata, image: bytes, workdir: Path, requests: int) -> dict:
    """CPU milliseconds per sequential Explain of each serving process."""
    write_archive(model, metadata, workdir / "store", batch_size=1, max_batch_delay_ms=1)
    env = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with local_service(workdir / "store", [metadata["name"]], workdir, ready_timeout=600, env=env) as (
            torchserve, gateway, target):
        wrapper = psutil.Process(torchserve.process.pid)
        jvm = [p for p in [wrapper, *wrapper.children(recursive=True)] if "java" in p.name()]
        workers = [p for p in jvm[0].children(recursive=True)] if jvm else []
        processes = {"gateway": [psutil.Process(gateway.pid)], "torchserve_frontend": jvm,
                     "torchserve_worker": workers}
        request = build_request(image, model=metadata["name"], methods=METHODS)
        with ExplainClient(target) as client:
            for _ in range(10):  # warm up both hops and the worker
                client.send(request, timeout=120)
            before = {name: sum(process_cpu(p) for p in group) for name, group in processes.items()}
            client_before = time.process_time()
            for _ in range(requests):
                client.explain(image, model=metadata["name"], methods=METHODS, timeout=120)
            figures = {"client": (time.process_time() - client_before) / requests * 1e3}
            for name, group in processes.items():
                figures[name] = (sum(process_cpu(p) for p in group) - before[name]) / requests * 1e3
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential Explain calls timed")
    parser.add_argument("--repeats", type=int, default=50, help="in-process repetitions per stage")
    args = parser.parse_args()
    if args.requests < 1 or args.repeats < 1:
        parser.error("--requests and --repeats must be >= 1")
    torch.set_num_threads(1)
    print(f"load_average_at_start={load_average()}")
    model, metadata = demo_model("image")
    side = metadata["input_size"]
    image = png(np.random.default_rng(0).integers(0, 256, (*side, 3), dtype=np.uint8))
    figures, library = stages(model, metadata, image, args.repeats)
    with tempfile.TemporaryDirectory(prefix="explainserve-overhead-") as scratch:
        processes = served(model, metadata, image, Path(scratch), args.requests)
    for name, value in figures.items():
        print(f"stage_cpu_ms_{name}={value:.3f}")
    for name, value in processes.items():
        print(f"served_cpu_ms_{name}={value:.3f}")
    total = sum(value for name, value in processes.items() if name != "client")
    print(f"served_cpu_ms_total={total:.3f}  (gateway + TorchServe frontend + worker; the client apart)")
    print(f"library_cpu_ms={library:.3f}")
    print(f"overhead_fraction={1 - library / total:.3f}")
    print(f"load_average_at_end={load_average()}")


if __name__ == "__main__":
    main()
