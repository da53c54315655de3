"""Real TorchServe + real gateway processes on free loopback ports, for the serving tests."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from explainserve.anomaly import StoreMeta
from explainserve.explainer import Explainer
from explainserve.model_archive import write_archive
from explainserve.sidecar.local import health, start_gateway, stop_gateway, wait_serving  # noqa: F401 - used by the tests
from explainserve.sidecar.torchserve import TorchServe, TorchServeConfig, log_tail

IMAGE_SIZE = (64, 64)
CLIP_SIZE = (4, 32, 32)
N_CLASSES = 6


def tiny_image_model(name: str = "tiny_image", n_classes: int = N_CLASSES) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=n_classes).eval()
    metadata = {
        "name": name, "version": "1.0", "kind": "image", "input_size": list(IMAGE_SIZE),
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_names": [f"thing{i}" for i in range(n_classes)],
        "layer": None, "architecture": {"factory": "torchvision.models.resnet18", "kwargs": {"num_classes": n_classes}},
        "build_timestamp": 1.7e9,
    }
    return model, metadata


def tiny_video_model() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(2)
    model = torchvision.models.video.r3d_18(num_classes=N_CLASSES).eval()
    metadata = {
        "name": "tiny_video", "version": "1.0", "kind": "video", "input_size": list(CLIP_SIZE),
        "mean": [0.45, 0.45, 0.45], "std": [0.225, 0.225, 0.225], "class_names": [f"act{i}" for i in range(N_CLASSES)],
        "layer": None, "architecture": {"factory": "torchvision.models.video.r3d_18", "kwargs": {"num_classes": N_CLASSES}},
        "build_timestamp": 1.7e9,
    }
    return model, metadata


def explainer_for(model: torch.nn.Module, metadata: dict) -> Explainer:
    """The in-process library the served maps are compared with."""
    return Explainer(model, kind=metadata["kind"], input_size=metadata["input_size"], mean=metadata["mean"],
                     std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"],
                     multi_label=metadata.get("multi_label", False))


def store_meta_for(meta: StoreMeta, model: torch.nn.Module, metadata: dict) -> StoreMeta:
    """``meta`` (a synthetic store's) made that of a store built from the archived model: its name,
    version and classes, the layer its handler explains and its input transform, which the gateway
    checks against the handler's describe()."""
    explainer = explainer_for(model, metadata)
    return dataclasses.replace(meta, model_name=metadata["name"], model_version=metadata["version"],
                               class_names=tuple(metadata["class_names"]), layer=explainer.layer,
                               num_filters=explainer.num_filters,
                               input_transform={"input_size": list(explainer.input_size), "mean": metadata["mean"],
                                                "std": metadata["std"]})


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(seed: int, size=(72, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@dataclass
class Stack:
    torchserve: TorchServe
    gateway: subprocess.Popen
    target: str
    metrics_url: str
    workdir: Path

    def logs(self) -> str:
        return self.torchserve.log_tail(40) + "\n==> gateway.log <==\n" + log_tail(self.workdir / "gateway.log", 40)


@contextlib.contextmanager
def serving_stack(workdir: Path, archives: list[tuple[torch.nn.Module, dict]], *, batch_size: int = 4,
                  max_batch_delay_ms: int = 100, env: dict[str, str] | None = None, token_auth: bool = False,
                  gateway_args: tuple[str, ...] = (), prebuilt: tuple[str, ...] = ()):
    """Archive the models, start TorchServe and the gateway; always stop both.

    ``prebuilt`` names archives the test already wrote to ``workdir/model_store`` (with
    ``explainserve archive``), served beside ``archives``.

    ``token_auth`` runs TorchServe with token authorisation and the gateway with ``--token-file``;
    ``gateway_args`` are more sidecar flags (``--store-dir DIR``).
    """
    store = workdir / "model_store"
    for model, metadata in archives:
        write_archive(model, metadata, store, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms)
    torchserve = TorchServe(TorchServeConfig(
        model_store=store, models={name: f"{name}.mar" for name in [m["name"] for _, m in archives] + list(prebuilt)},
        workdir=workdir / "torchserve", grpc_inference_port=0, grpc_management_port=0,
        disable_token_auth=not token_auth, env=env or {}))
    stack = None
    try:
        torchserve.start().wait_ready(timeout=180)
        gateway, target, metrics_url = start_gateway(workdir, torchserve.grpc_target, torchserve.management_target,
                                                     token_file=torchserve.key_file, extra_args=gateway_args)
        stack = Stack(torchserve, gateway, target, metrics_url, workdir)
        wait_serving(target, timeout=60, process=gateway)
        yield stack
    except BaseException:
        print(stack.logs() if stack else torchserve.log_tail(), file=sys.stderr)
        raise
    finally:
        if stack is not None:
            stop_gateway(stack.gateway)  # tests may have replaced it with a restarted one
        torchserve.stop()


def wait_for(condition, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def stack_for_module(request, workdir: Path, archives, **options):
    """Body of a module-scoped fixture: yields a Stack, prints its logs if a test failed."""
    failed_before = request.session.testsfailed
    with serving_stack(workdir, archives, **options) as stack:
        yield stack
        if request.session.testsfailed > failed_before:
            request.config.pluginmanager.get_plugin("terminalreporter").write_line(stack.logs())


def build_demo_store(kind: str, out: Path, train_images: int, val_images: int, target_fpr: float = 0.05) -> Path:
    """A calibrated distribution store of demo model ``kind`` ("image": FashionScenes), built
    in-process by `explainserve build-distributions` on the first training / validation images.
    The default 5 % target lets a few dozen validation images reach it: half of them rank, and
    a p-value is never below 1 / (ranked + 1)."""
    import argparse

    from explainserve.commands import distributions

    data = {"image": "fashion-scenes", "video": "moving-fashion"}[kind]
    parser = argparse.ArgumentParser(prog="explainserve")
    distributions.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build-distributions", "--model", kind, "--data", data, "--out", str(out),
                              "--limit", str(train_images), "--val-limit", str(val_images),
                              "--target-fpr", str(target_fpr)])
    assert args.func(args) == 0
    return out


def scored_demo_stack(request, workdir: Path, more_archives=(), **options):
    """Body of a module-scoped fixture: the demo image model with its committed, calibrated
    distribution store (--store-dir), so that answers carry verdicts; ``more_archives``
    ((model, metadata) pairs) are served beside it without a store."""
    import shutil

    from explainserve.commands.archive import committed_store, demo_model

    model, metadata = demo_model("image")
    shutil.copytree(committed_store("image", metadata), workdir / "stores" / metadata["name"])
    yield from stack_for_module(request, workdir, [(model, metadata), *more_archives], batch_size=4,
                                max_batch_delay_ms=20, gateway_args=("--store-dir", str(workdir / "stores")), **options)
