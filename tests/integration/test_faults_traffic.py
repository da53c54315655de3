"""Faults in the traffic itself, against the shared real stack.

- Malformed traffic under load: bad requests through the gateway get their documented status
  codes; bad items sent straight to TorchServe share batches with good gateway requests and get
  in-band errors; no good request fails or gets another request's answer.
- Correctness under concurrency: 8 clients with distinct images and target classes; every
  answer's classes and maps equal the in-process library's for that client's image.
"""

from __future__ import annotations

import itertools
import json
import time

import grpc
import pytest

from explainserve.client import ExplainClient, build_request
from explainserve.explainer import ExplainOptions
from explainserve.wire import HANDLER_REQUEST_KEY
from explainserve._generated import handler_pb2, inference_pb2, inference_pb2_grpc
from support.fault_load import MODEL, BackgroundLoad, explain_call, worker_processes
from load_tests.payloads import malformed_requests
from support.serving_harness import N_CLASSES, explainer_for, png, random_image
from test_serving_e2e import assert_maps_match_library

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
OK = grpc.StatusCode.OK
GOOD_CLIENTS = 2  # fewer than the batch size, so a batch of 3+ holds a bad item
INVALID_ARGUMENT = 3  # google.rpc.Code in HandlerError


def direct_bad_items(image) -> list[tuple[str, dict]]:
    """Bad inputs for TorchServe's own Predictions API; each must fail alone, in-band."""
    out_of_range = build_request(image, model=MODEL, methods=["grad_cam"], target_class=N_CLASSES + 3)
    return [
        ("unparsable internal request", {HANDLER_REQUEST_KEY: b"\xff\x00 not a protobuf"}),
        ("target out of range", {HANDLER_REQUEST_KEY: out_of_range.SerializeToString()}),
        ("plain garbage", {"data": b"GIF89a but not really"}),
    ]


def direct_error_code(prediction: bytes, internal: bool) -> int | str:
    if internal:
        answer = handler_pb2.HandlerResponse.FromString(prediction)
        return answer.error.code if answer.WhichOneof("result") == "error" else "answered"
    return json.loads(prediction).get("error", {}).get("code", "answered")


def test_malformed_traffic_under_load_fails_alone(fault_stack, fault_model):
    model, metadata = fault_model
    images = [random_image(400 + i) for i in range(GOOD_CLIENTS)]
    expected = explainer_for(model, metadata).explain(images, ["grad_cam"], ExplainOptions(top_k=5))
    bad_gateway = malformed_requests(MODEL, random_image(410), N_CLASSES)
    bad_direct = direct_bad_items(random_image(411))
    channel = grpc.insecure_channel(fault_stack.torchserve.grpc_target)
    torchserve = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    gateway = ExplainClient(fault_stack.target)
    gateway_cases, direct_cases = itertools.cycle(bad_gateway), itertools.cycle(bad_direct)

    def bad_call(client: int, _sequence: int):
        if client == 0:  # through the gateway: refused before TorchServe
            case = next(gateway_cases)
            try:
                gateway.send(case.request, timeout=30)
            except Exception as error:  # noqa: BLE001 - the code is what is checked
                return case.name, case.code, getattr(error, "code", None)
            return case.name, case.code, OK
        name, inputs = next(direct_cases)  # straight to TorchServe: batched with good requests
        prediction = torchserve.Predictions(inference_pb2.PredictionsRequest(model_name=MODEL, input=inputs),
                                            timeout=30).prediction
        expected_code = INVALID_ARGUMENT if HANDLER_REQUEST_KEY in inputs else "INVALID_ARGUMENT"
        return name, expected_code, direct_error_code(prediction, HANDLER_REQUEST_KEY in inputs)

    (worker,) = worker_processes(fault_stack)
    good = BackgroundLoad(explain_call(fault_stack.target, images, ["grad_cam"], timeout=60), GOOD_CLIENTS)
    bad = BackgroundLoad(bad_call, 3)
    started = time.monotonic()
    with good, bad:
        good.wait_for_calls(8 * GOOD_CLIENTS, timeout=90)
        bad.wait_for_calls(len(bad_gateway) + 2 * len(bad_direct), timeout=90)
    gateway.close()
    channel.close()

    assert all(c.code == OK for c in good.calls), [(c.code, c.details) for c in good.calls if c.code != OK]
    for call in good.calls:
        assert [index for index, _, _ in call.result.classes] == expected[call.client].classes.tolist()
        assert_maps_match_library(call.result, expected[call.client], ["grad_cam"])
    assert all(c.code == OK for c in bad.calls), [(c.code, c.details) for c in bad.calls if c.code != OK]
    wrong = [c.result for c in bad.calls if c.result[1] != c.result[2]]
    assert not wrong, wrong  # (case, documented code, code received)
    assert {c.result[0] for c in bad.calls} >= {case.name for case in bad_gateway} | {name for name, _ in bad_direct}
    mixed = max(call.result.timings["batch_size"] for call in good.calls)
    print(f"malformed under load: {len(good.calls)} good calls all OK, {len(bad.calls)} bad calls each with its code, "
          f"largest batch {mixed} ({time.monotonic() - started:.1f} s)")
    assert mixed > GOOD_CLIENTS, "no batch mixed good and bad items"
    assert worker.is_running() and worker_processes(fault_stack)[0].pid == worker.pid, "the worker was restarted"


def test_concurrent_clients_each_get_their_own_answer(fault_stack, fault_model):
    model, metadata = fault_model
    clients = 8
    methods = ["swag_i_g", "jitter_cam", "grad_cam"]
    images = [random_image(500 + i, size=(56 + 4 * i, 64)) for i in range(clients)]
    targets = [i % N_CLASSES for i in range(clients)]
    explainer = explainer_for(model, metadata)
    options = ExplainOptions(n_segments=40, top_k=5)
    expected = [explainer.explain([image], methods, options, targets=[target])[0] for image, target in zip(images, targets)]

    clients_by_index: dict[int, ExplainClient] = {}

    def call(client: int, _sequence: int):
        own = clients_by_index.setdefault(client, ExplainClient(fault_stack.target))
        return own.explain(images[client], model=MODEL, methods=methods, n_segments=40, target_class=targets[client],
                           timeout=120)

    with BackgroundLoad(call, clients) as load:
        load.wait_for_calls(2 * clients, timeout=150)
    for own in clients_by_index.values():
        own.close()

    assert all(c.code == OK for c in load.calls), [(c.code, c.details) for c in load.calls if c.code != OK]
    assert {c.client for c in load.calls} == set(range(clients))
    for call_record in load.calls:
        result, reference = call_record.result, expected[call_record.client]
        assert result.target_class == targets[call_record.client]
        assert [index for index, _, _ in result.classes] == reference.classes.tolist()
        assert_maps_match_library(result, reference, methods)
    batch_sizes = [c.result.timings["batch_size"] for c in load.calls]
    print(f"concurrency: {len(load.calls)} answers from {clients} clients, batch sizes {sorted(set(batch_sizes))}")
    assert max(batch_sizes) > 1
