"""Open Inference Protocol requests to Explain requests and answers to tensors (no processes)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from explainserve._generated import explain_pb2, grpc_predict_v2_pb2 as oip
from explainserve.sidecar import oip as service
from explainserve.sidecar.oip_tensors import input_array, output_tensor, split_bytes

IMAGE = {"name": "m", "kind": "image", "input_size": [8, 8], "methods": ["swag_i_g", "jitter_cam"], "version": "2"}
VIDEO = {"name": "v", "kind": "video", "input_size": [2, 8, 8], "methods": ["swag_v_i_g"], "version": "1"}


def infer_request(datatype: str, shape, raw: bytes | None = None, contents=None, **parameters):
    request = oip.ModelInferRequest(model_name="m", id="r1")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    if contents is not None:
        tensor.contents.CopyFrom(contents)
    if raw is not None:
        request.raw_input_contents.append(raw)
    for name, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    return request


def test_raw_and_typed_contents_decode_to_the_same_array():
    pixels = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    raw = input_array(oip.ModelInferRequest.InferInputTensor(datatype="UINT8", shape=[2, 8, 8, 3]), pixels.tobytes(), "x")
    typed = input_array(oip.ModelInferRequest.InferInputTensor(
        datatype="UINT8", shape=[2, 8, 8, 3], contents=oip.InferTensorContents(uint_contents=pixels.ravel().tolist())),
        None, "x")
    assert np.array_equal(raw, pixels) and np.array_equal(typed, pixels)
    with pytest.raises(ValueError, match=r"x: shape \[2, 8, 8, 3\] of UINT8 needs 384 raw bytes, got 10"):
        input_array(oip.ModelInferRequest.InferInputTensor(datatype="UINT8", shape=[2, 8, 8, 3]), b"0" * 10, "x")
    with pytest.raises(ValueError, match="datatype: expected one of"):
        input_array(oip.ModelInferRequest.InferInputTensor(datatype="FP8", shape=[1]), b"0", "x")


def test_bytes_elements_are_length_prefixed():
    raw = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    assert split_bytes(raw, "x") == [b"abc", b""]
    with pytest.raises(ValueError, match="runs past the data's end"):
        split_bytes(struct.pack("<I", 9) + b"abc", "x")
    tensor, encoded = output_tensor("verdict", ["NORMAL", "ANOMALOUS"])
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2]) and split_bytes(encoded, "v") == [b"NORMAL", b"ANOMALOUS"]
    tensor, encoded = output_tensor("h", np.ones((2, 3), np.float32))
    assert (tensor.datatype, list(tensor.shape), len(encoded)) == ("FP32", [2, 3], 24)


def test_parameters_fill_an_explain_request_and_unknown_ones_are_refused():
    request = infer_request("BYTES", [1], contents=oip.InferTensorContents(bytes_contents=[b"png"]),
                            methods="swag_i_g, jitter_cam", n_segments=50, wc=8.0, label=2, top_k=3,
                            explain_anomaly=True)
    template = service.explain_template(request)
    assert list(template.methods) == ["swag_i_g", "jitter_cam"] and template.options.n_segments == 50
    assert template.options.wc == 8.0 and template.label == 2 and template.top_k == 3 and template.explain_anomaly
    with pytest.raises(ValueError, match="parameters.colour: unknown; accepted: methods"):
        service.explain_template(infer_request("BYTES", [1], colour="blue"))
    with pytest.raises(ValueError, match="parameters.label: expected int"):
        service.explain_template(infer_request("BYTES", [1], label="two"))
    with pytest.raises(ValueError, match="parameters.top_k: expected int"):
        service.explain_template(infer_request("BYTES", [1], top_k=True))


def test_each_batch_element_becomes_one_explain_request():
    images = infer_request("BYTES", [2, 1], contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"]), top_k=2)
    requests = service.explain_requests(images, service.explain_template(images), IMAGE)
    assert [r.image for r in requests] == [b"a", b"b"] and all(r.top_k == 2 and r.model == "m" for r in requests)
    clips = np.zeros((3, 2, 8, 8, 3), np.uint8)
    clips[1] = 7
    request = infer_request("UINT8", [3, 2, 8, 8, 3], raw=clips.tobytes())
    requests = service.explain_requests(request, service.explain_template(request), VIDEO)
    assert len(requests) == 3 and list(requests[1].clip.shape) == [2, 8, 8, 3]
    assert requests[1].clip.raw == clips[1].tobytes()
    videos = service.explain_requests(images, service.explain_template(images), VIDEO)  # encoded video files
    assert [r.clip.video for r in videos] == [b"a", b"b"]
    with pytest.raises(ValueError, match=r"video model 'v' takes BYTES \[N\] of encoded MP4/WebM/AVI files, "
                                         r"or UINT8 \[N, T, H, W, 3\]; got UINT8 \[3, 8, 8\]"):
        flat = infer_request("UINT8", [3, 8, 8], raw=bytes(192))
        service.explain_requests(flat, service.explain_template(flat), VIDEO)
    with pytest.raises(ValueError, match="inputs: expected one tensor"):
        service.explain_requests(oip.ModelInferRequest(), explain_pb2.ExplainRequest(), IMAGE)


def test_outputs_asked_for_must_be_answered():
    template = explain_pb2.ExplainRequest(methods=["swag_i_g"])
    service.check_outputs(["verdict", "segments_swag_i_g"], template, IMAGE)
    with pytest.raises(ValueError, match=r"outputs: \['heatmap_jitter_cam'\] not answered"):
        service.check_outputs(["heatmap_jitter_cam"], template, IMAGE)
