"""`explainserve demo` (what `make demo` runs) end to end, on free ports: archives, TorchServe and
the gateway started, scenes and a clip explained, pictures written, the service left running and
then stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from explainserve.sidecar.torchserve import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_the_demo_runs_end_to_end_and_leaves_the_service_running(tmp_path):
    ports = {name: free_port() for name in ("port", "metrics-port", "torchserve-grpc-port", "torchserve-management-port")}
    out = tmp_path / "out"
    demo = [sys.executable, "-m", "explainserve.cli", "demo", "--out", str(out), "--model-store", str(tmp_path / "store"),
            "--images", "1", "--ood-images", "4", *[f"--{name}={port}" for name, port in ports.items()]]
    try:
        run = subprocess.run(demo, capture_output=True, text=True, timeout=840)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "scene 0 (true: " in run.stdout and "anomaly: OK" in run.stdout
        assert f"the service is still running on 127.0.0.1:{ports['port']}" in run.stdout
        # one picture per method: SWAG_I+G at scene_0.png, Jitter-CAM beside it, the clip's SWAG-V
        assert {path.name for path in out.glob("*.png")} >= {"scene_0.png", "scene_0_jitter_cam.png", "clip_0.png"}
    finally:
        stopped = subprocess.run([sys.executable, "-m", "explainserve.cli", "stop", "--run-dir", str(out / "serve")],
                                 capture_output=True, text=True, timeout=120)
    assert "stopped torchserve" in stopped.stdout, stopped.stdout + stopped.stderr
