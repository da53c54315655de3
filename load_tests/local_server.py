"""A local TorchServe + gateway for load runs, started with the ``explainserve`` commands.

The demo models are served when they can be archived (``explainserve archive --demo``);
otherwise random-init torchvision models of the same input sizes stand in for them (ResNet-18
on 64x64 images, R3D-18 on 16x64x64 clips, 8 classes), which cost the same to explain.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from explainserve.sidecar.torchserve import free_port

CLI = [sys.executable, "-m", "explainserve.cli"]
N_CLASSES = 8
STAND_INS = {
    "image": ["--torchvision", "resnet18", "--input-size", "64", "64", "--name", "load_image"],
    "video": ["--torchvision", "r3d_18", "--input-size", "16", "64", "64", "--name", "load_video"],
}


@dataclass
class LocalServer:
    target: str  # host:port of the Explain API
    metrics_url: str
    image_model: str
    video_model: str


def build_archives(store: Path, batch_size: int, max_batch_delay_ms: int) -> tuple[str, str]:
    """Archive the demo models (or their stand-ins) into ``store``; returns the two model names."""
    common = ["--export-path", str(store), "--batch-size", str(batch_size),
              "--max-batch-delay-ms", str(max_batch_delay_ms)]
    names = []
    for kind in ("image", "video"):
        demo = subprocess.run([*CLI, "archive", "--demo", kind, *common], capture_output=True, text=True)
        if demo.returncode == 0:
            names.append(f"demo_{kind}")
            continue
        print(f"demo {kind} model unavailable ({demo.stderr.strip().splitlines()[-1]}); "
              f"serving a random-init stand-in", file=sys.stderr)
        subprocess.run([*CLI, "archive", *STAND_INS[kind], "--num-classes", str(N_CLASSES), *common], check=True)
        names.append(STAND_INS[kind][STAND_INS[kind].index("--name") + 1])
    return names[0], names[1]


@contextlib.contextmanager
def local_server(workdir: Path, *, batch_size: int = 4, max_batch_delay_ms: int = 20):
    """Archive, ``explainserve serve`` on free loopback ports, yield a LocalServer, then stop."""
    store, run_dir = workdir / "model_store", workdir / "serve"
    store.mkdir(parents=True, exist_ok=True)
    image_model, video_model = build_archives(store, batch_size, max_batch_delay_ms)
    port, metrics_port = free_port(), free_port()
    subprocess.run([*CLI, "serve", "--model-store", str(store), "--models", image_model, video_model,
                    "--port", str(port), "--metrics-port", str(metrics_port),
                    "--torchserve-grpc-port", str(free_port()), "--torchserve-management-port", str(free_port()),
                    "--run-dir", str(run_dir)], check=True)
    try:
        yield LocalServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", image_model, video_model)
    finally:
        subprocess.run([*CLI, "stop", "--run-dir", str(run_dir)], check=False)
