"""Each bad request gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message, and the next
request is served normally (real TorchServe and gateway, started by `explainserve serve`)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import grpc
import numpy as np
import pytest

from explainserve._generated import explain_pb2
from explainserve.client import ExplainClient, ExplainError, build_request
from explainserve.model_archive import write_archive
from explainserve.sidecar.torchserve import free_port
from support.serving_harness import CLIP_SIZE, png, random_image, tiny_image_model, tiny_video_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
INVALID, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height pixels."""
    data = png(random_image(0, (16, 16)))
    header = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def clip_of(frames: int) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, *CLIP_SIZE[1:], 3), dtype=np.uint8)


GOOD = random_image(7)
CASES = {
    # name: (request, expected code, words the message must contain)
    "corrupt image": (build_request(png(GOOD)[:60] + b"\x00" * 40, model="tiny_image"), INVALID, "image"),
    "garbage bytes": (build_request(b"definitely not a picture", model="tiny_image"), INVALID, "JPEG or PNG"),
    "empty payload": (build_request(b"", model="tiny_image"), INVALID, "empty"),
    "no input": (build_request([], model="tiny_video"), INVALID, "neither"),
    "1x1 image": (build_request(png(random_image(0, (1, 1))), model="tiny_image"), INVALID, "at least"),
    "claims 20000x20000": (build_request(png_claiming(20000, 20000), model="tiny_image"), TOO_BIG, "too large"),
    "wider than the limit": (build_request(png(random_image(0, (8, 9000))), model="tiny_image"), TOO_BIG, "9000"),
    "unknown method": (build_request(GOOD, model="tiny_image", methods=["lime"]), INVALID, "lime"),
    "video method on an image model": (build_request(GOOD, model="tiny_image", methods=["swag_v_g"]), INVALID, "swag_v_g"),
    "n_segments 0": (build_request(GOOD, model="tiny_image", methods=["swag_i"], n_segments=0), INVALID, "n_segments"),
    "n_segments 1e6": (build_request(GOOD, model="tiny_image", methods=["swag_i"], n_segments=10**6), INVALID, "n_segments"),
    "negative d": (build_request(GOOD, model="tiny_image", methods=["jitter_cam"], jitter_d=-1), INVALID, "jitter_d"),
    "zero wc": (build_request(GOOD, model="tiny_image", methods=["swag_i"], wc=0.0), INVALID, "wc"),
    "target out of range": (build_request(GOOD, model="tiny_image", target_class=6), INVALID, "target_class"),
    "negative label": (build_request(GOOD, model="tiny_image", label=-1), INVALID, "label"),
    "top_k too large": (build_request(GOOD, model="tiny_image", top_k=7), INVALID, "top_k"),
    "wrong clip length": (build_request(clip_of(CLIP_SIZE[0] + 1), model="tiny_video"), INVALID, "frames"),
    "corrupt video file": (explain_pb2.ExplainRequest(model="tiny_video", clip=explain_pb2.Clip(video=b"\x00" * 512)),
                           INVALID, "not a decodable MP4, WebM or AVI"),
    "video and frames": (explain_pb2.ExplainRequest(model="tiny_video", clip=explain_pb2.Clip(video=b"v", frames=[b"f"])),
                         INVALID, "give one of"),
    # Refused from the frames' headers: 4 x 2100 x 2100 pixels would decode to 50 MiB.
    "clip over the pixel budget": (build_request([png_claiming(2100, 2100)] * CLIP_SIZE[0], model="tiny_video"),
                                   TOO_BIG, "pixels decoded"),
    "16 frames of 4096 x 4096": (build_request([png_claiming(4096, 4096)] * 16, model="tiny_video"), INVALID,
                                 "the model takes 4 frames, got 16"),
    "clip raw/shape mismatch": (build_request(clip_of(CLIP_SIZE[0]), model="tiny_video"), None, None),
    "clip sent to an image model": (build_request(clip_of(CLIP_SIZE[0]), model="tiny_image"), INVALID, "image"),
    "unknown model": (build_request(GOOD, model="no_such_model"), INVALID, "no_such_model"),
    "no model": (build_request(GOOD, model=""), INVALID, "model"),
}
# A raw clip whose bytes do not match its shape.
CASES["clip raw/shape mismatch"][0].clip.raw = b"\x00" * 10
CASES["clip raw/shape mismatch"] = (CASES["clip raw/shape mismatch"][0], INVALID, "bytes")


def process_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The stack as a user starts it: `explainserve serve`, then `explainserve stop`."""
    workdir = tmp_path_factory.mktemp("bad_input")
    for model, metadata in (tiny_image_model(), tiny_video_model()):
        write_archive(model, metadata, workdir / "store", batch_size=2, max_batch_delay_ms=10)
    cli, run_dir, port = [sys.executable, "-m", "explainserve.cli"], workdir / "run", free_port()
    ports = [str(free_port()) for _ in range(3)]
    started = subprocess.run(
        cli + ["serve", "--model-store", str(workdir / "store"), "--port", str(port), "--metrics-port", ports[0],
               "--torchserve-grpc-port", ports[1], "--torchserve-management-port", ports[2], "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300)
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "token authorisation is disabled" in started.stderr
        with ExplainClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        stopped = subprocess.run(cli + ["stop", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not (run_dir / "state.json").exists()
        for name in ("gateway_pid", "torchserve_pid"):
            assert wait_for(lambda: not process_alive(state[name]), timeout=30), f"{name} still running"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_and_the_next_is_served(client, case):
    request, code, words = CASES[case]
    with pytest.raises(ExplainError) as refused:
        client.send(request, timeout=60)
    assert refused.value.code == code, refused.value
    assert words in refused.value.details
    after = client.explain(GOOD, model="tiny_image", timeout=60)
    assert len(after.classes) == 5
