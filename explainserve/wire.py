"""Numpy arrays to and from the ``explainserve.v1.Tensor`` message.

Heatmaps travel as uint8 with a scale and an offset (value = offset + scale * q), so the
round-trip error is at most ``scale / 2``; labels and scores travel losslessly.
"""

from __future__ import annotations

import time

import numpy as np

from explainserve._generated import explain_pb2

# Both hops (client -> gateway, gateway -> TorchServe) carry full-resolution maps and clips;
# TorchServe's default limit is 6553500 bytes.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The input-map key under which the gateway sends a serialised ExplainRequest to TorchServe.
HANDLER_REQUEST_KEY = "explainserve.v1.ExplainRequest"
# Beside it, a serialised RegionRequest asks for the regions that triggered given filters.
REGION_REQUEST_KEY = "explainserve.v1.RegionRequest"
# And the time (seconds since the epoch, ASCII) after which the caller no longer waits for the answer:
# the handler skips such a request before decoding it and again before its network pass.
DEADLINE_KEY = "explainserve.deadline"


def deadline_entry(seconds_left: float) -> bytes:
    """The DEADLINE_KEY value for a call that may take ``seconds_left`` more seconds."""
    return f"{time.time() + seconds_left:.3f}".encode()


def deadline_passed(entry) -> bool:
    """Whether a DEADLINE_KEY value (bytes, str or None: no deadline) lies in the past."""
    if entry is None:
        return False
    return time.time() > float(bytes(entry) if not isinstance(entry, str) else entry)


# google.rpc.Code numbers a handler writes into HandlerError.code; the gateway answers with
# the status of the same name.
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
CODE_NAMES = {INVALID_ARGUMENT: "INVALID_ARGUMENT", DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
              RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED", INTERNAL: "INTERNAL"}

_DTYPES = {
    explain_pb2.Tensor.UINT8: np.dtype("<u1"),
    explain_pb2.Tensor.UINT16: np.dtype("<u2"),
    explain_pb2.Tensor.INT32: np.dtype("<i4"),
    explain_pb2.Tensor.FLOAT16: np.dtype("<f2"),
    explain_pb2.Tensor.FLOAT32: np.dtype("<f4"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def quantized_tensor(values: np.ndarray) -> explain_pb2.Tensor:
    """Encode float values as uint8 spanning [min, max] (error <= scale / 2)."""
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite to be quantised")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    scale = (high - low) / 255.0
    quantized = np.zeros(values.shape, np.uint8) if scale == 0 else np.rint((values - low) / scale).astype(np.uint8)
    return explain_pb2.Tensor(
        shape=list(values.shape), dtype=explain_pb2.Tensor.UINT8,
        data=quantized.tobytes(), scale=scale, offset=low,
    )


def exact_tensor(values: np.ndarray) -> explain_pb2.Tensor:
    """Encode an array losslessly; int arrays use uint16 when their values fit."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        fits_uint16 = values.size == 0 or (values.min() >= 0 and values.max() <= np.iinfo(np.uint16).max)
        values = values.astype("<u2" if fits_uint16 else "<i4")
    elif values.dtype.kind == "f":
        values = values.astype("<f2" if values.dtype == np.float16 else "<f4")
    else:
        raise ValueError(f"cannot encode an array of dtype {values.dtype}")
    return explain_pb2.Tensor(shape=list(values.shape), dtype=_CODES[values.dtype], data=values.tobytes())


def to_numpy(tensor: explain_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor message; quantised uint8 maps come back as float32."""
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"tensor has an unknown dtype code {tensor.dtype}")
    array = np.frombuffer(tensor.data, dtype=_DTYPES[tensor.dtype]).reshape(tuple(tensor.shape))
    if tensor.dtype == explain_pb2.Tensor.UINT8:  # always a quantised map
        return (tensor.offset + tensor.scale * array.astype(np.float32)).astype(np.float32)
    return array.copy()
