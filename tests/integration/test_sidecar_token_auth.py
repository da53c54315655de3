"""The gateway in front of a real TorchServe with token authorisation on (as in the chart).

TorchServe writes key_file.json into its working directory; the gateway reads it with
--token-file, re-reads it when it changes or when TorchServe refuses a key, and answers
UNAVAILABLE with the reason, promptly, while it has no usable key.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from explainserve._generated import inference_pb2_grpc
from explainserve.client import ExplainClient, ExplainError
from explainserve.sidecar.torchserve import free_port
from support.serving_harness import health, random_image, stack_for_module, start_gateway, stop_gateway, tiny_image_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    yield from stack_for_module(request, tmp_path_factory.mktemp("tokens"), [tiny_image_model()], batch_size=1,
                                max_batch_delay_ms=1, token_auth=True)


@pytest.fixture
def own_gateway(stack, tmp_path):
    """start(token_file or None) -> (target, log path): another gateway on the same TorchServe."""
    started = []

    def start(token_file):
        process, target, _ = start_gateway(tmp_path, stack.torchserve.grpc_target, stack.torchserve.management_target,
                                           token_file=token_file)
        started.append(process)
        assert wait_for(lambda: health(target), timeout=60) == NOT_SERVING
        return target, tmp_path / "gateway.log"

    yield start
    for process in started:
        stop_gateway(process)


def keys(stack) -> dict:
    return json.loads(stack.torchserve.key_file.read_text())


def bearer(key: str):
    return (("authorization", f"Bearer {key}"),)


def ping(stack, metadata=None):
    with grpc.insecure_channel(stack.torchserve.grpc_target) as channel:
        answer = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Ping(empty_pb2.Empty(), timeout=10,
                                                                           metadata=metadata)
    return json.loads(answer.health)["status"]


def explain_failure(target: str) -> ExplainError:
    """The error of an Explain call, which must come back well before its 30 s deadline."""
    with ExplainClient(target) as client:
        started = time.monotonic()
        with pytest.raises(ExplainError) as failed:
            client.explain(random_image(0), model="tiny_image", timeout=30)
    assert time.monotonic() - started < 10
    return failed.value


def log_has(path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def test_torchserve_refuses_grpc_calls_without_the_inference_key(stack):
    with pytest.raises(grpc.RpcError) as refused:
        ping(stack)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Token Authorization failed" in refused.value.details()
    with pytest.raises(grpc.RpcError) as wrong_kind:  # each port takes its own key only
        ping(stack, bearer(keys(stack)["management"]["key"]))
    assert wrong_kind.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ping(stack, bearer(keys(stack)["inference"]["key"])) == "Healthy"


def test_explain_works_with_the_key_file(stack):
    assert health(stack.target) == SERVING
    with ExplainClient(stack.target) as client:
        result = client.explain(random_image(1), model="tiny_image", methods=["grad_cam"], timeout=120)
    assert result.maps["grad_cam"].heatmap.shape == (64, 64)


def test_regenerated_keys_are_read_again(stack):
    old = keys(stack)
    for kind in ("inference", "management"):  # TorchServe's token API rewrites key_file.json
        url = f"http://127.0.0.1:{stack.torchserve.config.management_port}/token?type={kind}"
        request = urllib.request.Request(url, headers=dict(bearer(old["API"]["key"])))
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    new = keys(stack)
    assert new["inference"]["key"] != old["inference"]["key"] and new["management"]["key"] != old["management"]["key"]
    with pytest.raises(grpc.RpcError):
        ping(stack, bearer(old["inference"]["key"]))
    with ExplainClient(stack.target) as client:
        client.explain(random_image(2), model="tiny_image", timeout=120)
    # The health poll (every 0.5 s) may still hold the old key's refusal: it must recover by itself.
    assert wait_for(lambda: health(stack.target) == SERVING, timeout=10)


def test_a_missing_then_wrong_then_right_key_file(stack, own_gateway, tmp_path):
    key_file = tmp_path / "keys" / "key_file.json"
    target, log = own_gateway(key_file)

    # No file yet (TorchServe writes it at start-up): NOT_SERVING, UNAVAILABLE with the reason, logged.
    failure = explain_failure(target)
    assert failure.code == grpc.StatusCode.UNAVAILABLE and str(key_file) in failure.details
    assert "No such file or directory" in failure.details
    assert wait_for(lambda: log_has(log, "No such file or directory"), timeout=10)
    assert health(target) == NOT_SERVING

    # Keys TorchServe does not know: refused, re-read, refused again -> UNAVAILABLE naming the refusal.
    right = keys(stack)
    wrong = {kind: {**entry, "key": "x" * len(entry["key"])} for kind, entry in right.items()}
    key_file.parent.mkdir()
    key_file.write_text(json.dumps(wrong))
    failure = explain_failure(target)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert "refused the management key" in failure.details and "Token Authorization failed" in failure.details
    assert wait_for(lambda: log_has(log, "refused the inference key"), timeout=10)
    assert health(target) == NOT_SERVING

    # The right keys with the same size, inode and mtime: only the re-read after a refusal finds them.
    before = key_file.stat()
    key_file.write_text(json.dumps(right))
    os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = key_file.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    assert wait_for(lambda: health(target) == SERVING, timeout=30)
    with ExplainClient(target) as client:
        client.explain(random_image(3), model="tiny_image", timeout=120)


def test_without_a_token_file_the_refusal_is_reported(own_gateway):
    target, log = own_gateway(None)
    failure = explain_failure(target)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert "PERMISSION_DENIED" in failure.details and "Token Authorization failed" in failure.details
    assert wait_for(lambda: log_has(log, "--token-file"), timeout=10)
    assert health(target) == NOT_SERVING


def test_with_keys_but_no_torchserve_explain_is_unavailable_promptly(tmp_path):
    """TorchServe's own failures pass through the key interceptor unchanged."""
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({kind: {"key": "k"} for kind in ("inference", "management", "API")}))
    nowhere = f"127.0.0.1:{free_port()}"
    process, target, _ = start_gateway(tmp_path, nowhere, nowhere, token_file=key_file)
    try:
        assert wait_for(lambda: health(target), timeout=60) == NOT_SERVING
        failure = explain_failure(target)
        assert failure.code == grpc.StatusCode.UNAVAILABLE and "key" not in failure.details, failure
    finally:
        stop_gateway(process)
