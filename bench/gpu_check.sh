#!/usr/bin/env bash
# GPU check (under 5 minutes on one GPU): SWAG_G and Jitter-CAM latency of a random-init
# ResNet-50 at 224x224 on the GPU, their maps' agreement with the same passes on the CPU, and
# the TorchServe handler taking its device from the context (gpu_id 0), all in-process.
#
# Needs the project's dependencies (pip install -e .) and a CUDA build of torch; run from the
# repository root:  bash bench/gpu_check.sh   (PYTHON=... to choose the interpreter)
# Prints name=value lines; exits 1 when no GPU is usable. GPU_CHECK_DEVICE=cpu GPU_CHECK_REPEATS=1
# GPU_CHECK_ARCH=resnet18 runs the script itself on the CPU (a check of the script, not of a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "load_average_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
timeout 290 "$PYTHON" - <<'PY'
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from skimage import data
from skimage.transform import resize

from explainserve.client import build_request
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.model_archive import HANDLERS_DIR, METADATA_FILE, WEIGHTS_FILE
from explainserve.wire import HANDLER_REQUEST_KEY

GPU = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda:0"))
REPEATS = int(os.environ.get("GPU_CHECK_REPEATS", "30"))
if GPU.type == "cuda" and not torch.cuda.is_available():
    print("gpu_check: torch sees no CUDA device", file=sys.stderr)
    sys.exit(1)
synchronize = torch.cuda.synchronize if GPU.type == "cuda" else (lambda: None)
print(f"gpu_name={torch.cuda.get_device_name(GPU) if GPU.type == 'cuda' else GPU}")
print(f"torch={torch.__version__} cuda={torch.version.cuda} cudnn_tf32={torch.backends.cudnn.allow_tf32}")
ARCH = os.environ.get("GPU_CHECK_ARCH", "resnet50")
print(f"model={ARCH} input=224x224")
torch.manual_seed(0)
model = getattr(torchvision.models, ARCH)(num_classes=1000).eval()
META = {"kind": "image", "input_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "class_names": [f"class_{i}" for i in range(1000)], "layer": None}


def explainer(device) -> Explainer:
    return Explainer(copy.deepcopy(model), kind="image", input_size=META["input_size"], mean=META["mean"],
                     std=META["std"], class_names=META["class_names"], layer=META["layer"], device=device)


image = (resize(data.astronaut(), (224, 224), anti_aliasing=True) * 255).astype(np.uint8)
gpu, cpu = explainer(GPU), explainer("cpu")


def timed(explain, method: str, repeats: int) -> tuple[list, list]:
    seconds, results = [], []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        (result,) = explain.explain([image], [method], ExplainOptions())
        synchronize()
        seconds.append(time.perf_counter() - started)
        results.append(result)
    return seconds, results


def ms(values, q) -> float:
    return float(np.percentile(values, q) * 1e3)


for method in ("swag_g", "jitter_cam"):
    timed(gpu, method, min(3, REPEATS))  # warm-up: cuDNN autotuning, allocator
    seconds, results = timed(gpu, method, REPEATS)
    print(f"{method}_gpu_ms_p50={ms(seconds, 50):.2f}")
    print(f"{method}_gpu_ms_p95={ms(seconds, 95):.2f}")
    for stage in ("network", "superpixels", "jitter_cam"):
        if stage in results[0].timings:
            print(f"{method}_gpu_{stage}_ms_p50={ms([r.timings[stage] for r in results], 50):.2f}")
    started = time.perf_counter()
    (reference,) = cpu.explain([image], [method], ExplainOptions())
    print(f"{method}_cpu_ms={(time.perf_counter() - started) * 1e3:.1f}")
    served, expected = results[-1].maps[method], reference.maps[method]
    print(f"{method}_predicted_equal={int(results[-1].predicted == reference.predicted)}")
    print(f"{method}_map_correlation={np.corrcoef(served.heatmap.ravel(), expected.heatmap.ravel())[0, 1]:.5f}")
    scale = max(float(np.abs(expected.heatmap).max()), 1e-12)
    print(f"{method}_map_max_abs_diff_relative={float(np.abs(served.heatmap - expected.heatmap).max()) / scale:.2e}")
    if served.segments is not None:
        print(f"{method}_segment_labels_equal_fraction={float((served.segments == expected.segments).mean()):.4f}")
    alpha_scale = max(float(np.abs(reference.alpha).max()), 1e-12)
    print(f"{method}_alpha_max_abs_diff_relative={float(np.abs(results[-1].alpha - reference.alpha).max()) / alpha_scale:.2e}")
print("moonshot_targets_ms: swag_g_gpu_ms_p50<=15 jitter_cam_gpu_ms_p50<=20 (64 patches)")

# The served path: TorchServe's own Context with gpu_id 0, one Explain item through the handler.
sys.path.insert(0, str(HANDLERS_DIR))
from ts.context import Context, RequestProcessor  # noqa: E402
from image_handler import ImageHandler  # noqa: E402
import explainserve._generated.handler_pb2 as handler_pb2  # noqa: E402
from PIL import Image  # noqa: E402
import io  # noqa: E402

with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    architecture = {"factory": f"torchvision.models.{ARCH}", "kwargs": {"num_classes": 1000}}
    (folder / METADATA_FILE).write_text(json.dumps({**META, "name": "resnet50", "version": "1.0",
                                                    "architecture": architecture, "build_timestamp": time.time()}))
    handler = ImageHandler()
    handler.initialize(Context("resnet50", str(folder), {}, 1, 0 if GPU.type == "cuda" else None, "0.12.0"))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    context = Context("resnet50", "", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({})]
    request = build_request(buffer.getvalue(), model="resnet50", methods=["swag_g", "jitter_cam"])
    (answer,) = handler.handle([{HANDLER_REQUEST_KEY: request.SerializeToString()}], context)
    answer = handler_pb2.HandlerResponse.FromString(answer)
    print(f"handler_device={handler.device}")
    print(f"handler_answer_ok={int(answer.WhichOneof('result') == 'response')} "
          f"maps={[e.method for e in answer.response.explanations]}")
PY
echo "load_average_at_end=$(cut -d' ' -f1-3 /proc/loadavg)"
