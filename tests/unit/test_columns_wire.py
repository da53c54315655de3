"""The ScoreColumns request deserializer: alpha.data read as a view of the received bytes must
mean exactly what protobuf's parse of the same bytes means, answers and refusals alike."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from explainserve._generated import explain_pb2
from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.client import columns_request
from explainserve.sidecar.columns import parse_columns, score_columns
from explainserve.sidecar.columns_wire import ColumnsRequest, alpha_bytes, read_columns_request

FILTERS = 16


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A scorer of 4 synthetic classes and 40 alpha vectors of them."""
    synthetic = SyntheticClasses.random(4, FILTERS, seed=3)
    folder = build_store(synthetic.batches(100, batch_size=100), tmp_path_factory.mktemp("store") / "m", synthetic.meta,
                         top_k=2, build_time="2026-01-01T00:00:00Z")
    held_out = np.tile(np.arange(4), 50)
    save_calibration(load_store(folder), calibrate(load_store(folder), synthetic.sample(held_out, seed=5), held_out,
                                                   min_class_count=1))
    classes = np.tile(np.arange(4), 10)
    return Scorer(load_store(folder)), synthetic.sample(classes, seed=7), classes


def test_alpha_is_a_view_of_the_received_bytes_and_the_rest_is_protobufs(scored):
    _, alpha, classes = scored
    wire = columns_request(alpha, classes, model="m", model_version="v2", top_flags=3).SerializeToString()
    request = read_columns_request(wire)
    assert isinstance(request, ColumnsRequest)
    assert isinstance(request.alpha_data, memoryview) and request.alpha_data.obj is wire  # no copy of the 2-D data
    parsed = explain_pb2.ScoreColumnsRequest.FromString(wire)
    assert bytes(alpha_bytes(request)) == alpha_bytes(parsed) == alpha.astype("<f4").tobytes()
    assert request.message.alpha.data == b""  # left out of the small message protobuf parsed
    for field in ("model", "model_version", "top_flags"):
        assert getattr(request, field) == getattr(parsed, field)
    assert list(request.classes) == list(parsed.classes) and list(request.alpha.shape) == [len(alpha), FILTERS]
    assert request.HasField("top_flags") and request.alpha.dtype == explain_pb2.Tensor.FLOAT32
    view, flat, flags = parse_columns(request, FILTERS)
    assert not view.flags.writeable and np.array_equal(view, alpha) and np.array_equal(flat, classes) and flags == 3


@pytest.mark.parametrize("flags", [None, 0, 1, 5])
def test_answers_are_byte_identical_to_protobufs_parse(scored, flags):
    scorer, alpha, classes = scored
    wire = columns_request(alpha, classes, model="m", top_flags=flags).SerializeToString()
    ours = score_columns(scorer, read_columns_request(wire))
    theirs = score_columns(scorer, explain_pb2.ScoreColumnsRequest.FromString(wire))
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert len(ours.p_value) == len(alpha)


def tensor_field(**tensor) -> bytes:
    """A serialised ScoreColumnsRequest holding only ``alpha`` = Tensor(**tensor)."""
    return explain_pb2.ScoreColumnsRequest(alpha=explain_pb2.Tensor(**tensor)).SerializeToString()


@pytest.mark.parametrize("wire", [
    # protobuf merges a repeated message field and keeps the last of a repeated bytes field
    tensor_field(shape=[1, 4], data=b"\0" * 16) + tensor_field(shape=[2], data=b"\1" * 4),
    explain_pb2.ScoreColumnsRequest(model="m").SerializeToString(),  # no alpha at all
    b"",
], ids=["alpha twice", "no alpha", "empty"])
def test_irregular_messages_are_left_to_protobuf(wire):
    request = read_columns_request(wire)
    assert isinstance(request, explain_pb2.ScoreColumnsRequest)
    assert request == explain_pb2.ScoreColumnsRequest.FromString(wire)


def test_a_repeated_data_field_is_left_to_protobuf():
    tensor = explain_pb2.Tensor(shape=[1, 1], data=b"\0" * 4).SerializeToString() + b"\x1a\x04" + b"\1" * 4
    wire = b"\x1a" + bytes([len(tensor)]) + tensor  # alpha = field 3, its data (field 3) given twice
    request = read_columns_request(wire)
    assert isinstance(request, explain_pb2.ScoreColumnsRequest) and request.alpha.data == b"\1" * 4


def test_unknown_fields_and_an_empty_data_keep_their_meaning():
    wire = explain_pb2.ScoreColumnsRequest(model="m", alpha=explain_pb2.Tensor(shape=[1, 2])).SerializeToString()
    wire += b"\xa0\x06\x07"  # field 100, varint 7: unknown to this schema
    request = read_columns_request(wire)
    assert isinstance(request, ColumnsRequest) and bytes(request.alpha_data) == b""
    assert request.message.SerializeToString() == explain_pb2.ScoreColumnsRequest.FromString(wire).SerializeToString()


def test_a_truncated_message_is_refused_as_protobuf_refuses_it():
    wire = columns_request(np.ones((2, FILTERS)), [0, 1], model="m").SerializeToString()[:-5]
    with pytest.raises(DecodeError):
        explain_pb2.ScoreColumnsRequest.FromString(wire)
    with pytest.raises(DecodeError):
        read_columns_request(wire)


def test_refusals_name_the_same_field_with_the_same_words(scored):
    _, alpha, classes = scored
    request = columns_request(alpha[:3], classes[:3], model="m")
    request.alpha.data = request.alpha.data[:-4]
    wire = request.SerializeToString()
    messages = []
    for parsed in (read_columns_request(wire), explain_pb2.ScoreColumnsRequest.FromString(wire)):
        with pytest.raises(ValueError) as refused:
            parse_columns(parsed, FILTERS)
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and messages[0].startswith("alpha.data: 3 x 16 float32 values are 192 bytes, got 188")
