"""Read a ScoreColumnsRequest off the wire without copying its alpha bytes twice more.

gRPC hands the server a request as one ``bytes`` object. Parsing it with protobuf copies the
2 MB of a 256 x 2048 ``alpha.data`` into the message, and every read of ``alpha.data`` copies
them again into a new ``bytes``. :func:`read_columns_request` (the ScoreColumns and ScoreStream
request deserializer) parses everything but ``alpha.data`` with protobuf and keeps
``alpha.data`` as a view of the received bytes. A message it does not expect (a field given
twice, a wire type other than protobuf writes) is parsed by protobuf as a whole instead, so
what a request means never depends on which path read it.
"""

from __future__ import annotations

import grpc

from explainserve._generated import explain_pb2

ALPHA_FIELD = explain_pb2.ScoreColumnsRequest.DESCRIPTOR.fields_by_name["alpha"].number
DATA_FIELD = explain_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
LENGTH_DELIMITED = 2
# The methods whose requests are ScoreColumnsRequests.
COLUMNS_METHODS = ("/explainserve.v1.Explainer/ScoreColumns", "/explainserve.v1.Explainer/ScoreStream")


class Irregular(Exception):
    """A message this reader leaves to protobuf (repeated or unexpected fields, truncation)."""


class ColumnsRequest:
    """A ScoreColumnsRequest whose ``alpha.data`` is a view of the received bytes.

    Reads every other field from :attr:`message` (a ScoreColumnsRequest with an empty
    ``alpha.data``), so it answers what the full message would.

    Attributes
    ----------
    message : explain_pb2.ScoreColumnsRequest
        The request without ``alpha.data``.
    alpha_data : memoryview
        ``alpha.data``'s bytes, read-only, in the received buffer.
    """

    __slots__ = ("message", "alpha_data")

    def __init__(self, message: explain_pb2.ScoreColumnsRequest, alpha_data: memoryview):
        self.message = message
        self.alpha_data = alpha_data

    def __getattr__(self, name: str):
        return getattr(self.message, name)


def alpha_bytes(request) -> bytes | memoryview:
    """``request.alpha.data``: the view of a :class:`ColumnsRequest`, else a copy read from the message."""
    return request.alpha_data if isinstance(request, ColumnsRequest) else request.alpha.data


def read_columns_request(data: bytes) -> ColumnsRequest | explain_pb2.ScoreColumnsRequest:
    """The ScoreColumnsRequest serialised in ``data``: a :class:`ColumnsRequest` when ``alpha.data``
    is given once in a single ``alpha``, else protobuf's own parse (which raises on a malformed message)."""
    view = memoryview(data)
    try:
        kept, alpha = split_field(view, 0, len(view), ALPHA_FIELD)
        if alpha is None:
            raise Irregular("no alpha")
        tensor_kept, payload = split_field(view, *alpha, DATA_FIELD)
    except Irregular:
        return explain_pb2.ScoreColumnsRequest.FromString(data)
    tensor = b"".join(view[start:end] for start, end in tensor_kept)
    small = b"".join([*(view[start:end] for start, end in kept), varint(ALPHA_FIELD << 3 | LENGTH_DELIMITED),
                      varint(len(tensor)), tensor])
    message = explain_pb2.ScoreColumnsRequest.FromString(small)
    return ColumnsRequest(message, view[payload[0]:payload[1]] if payload is not None else memoryview(b""))


def split_field(view: memoryview, start: int, end: int, number: int) -> tuple[list, tuple[int, int] | None]:
    """The (start, end) spans of the fields of the message in ``view[start:end]`` other than
    field ``number``, and the span of that length-delimited field's payload (None if absent).

    Raises
    ------
    Irregular
        Field ``number`` given twice or with another wire type, or a field that runs past ``end``.
    """
    kept, found, position = [], None, start
    while position < end:
        field_start = position
        key, position = read_varint(view, position, end)
        wire_type = key & 7
        if wire_type == 0:
            _, position = read_varint(view, position, end)
        elif wire_type == 1:
            position += 8
        elif wire_type == LENGTH_DELIMITED:
            length, position = read_varint(view, position, end)
            position += length
        elif wire_type == 5:
            position += 4
        else:  # groups (3, 4) and invalid types
            raise Irregular(f"wire type {wire_type}")
        if position > end:
            raise Irregular("truncated")
        if key >> 3 != number:
            kept.append((field_start, position))
        elif wire_type != LENGTH_DELIMITED or found is not None:
            raise Irregular(f"field {number} repeated or not length-delimited")
        else:
            found = (position - length, position)
    return kept, found


def read_varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    """The base-128 varint at ``view[position]`` and the position after it."""
    value, shift = 0, 0
    while position < end and shift < 64:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise Irregular("bad varint")


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative ``value``."""
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        encoded.append(low | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


class ColumnsDeserializerInterceptor(grpc.aio.ServerInterceptor):
    """Gives ScoreColumns and ScoreStream :func:`read_columns_request` as their request deserializer
    (the innermost interceptor: the outer ones keep the deserializer of the handler they wrap)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method not in COLUMNS_METHODS:
            return handler
        return handler._replace(request_deserializer=read_columns_request)
