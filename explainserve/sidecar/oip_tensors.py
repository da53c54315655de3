"""Open Inference Protocol tensors <-> numpy: typed ``contents`` or ``raw_*_contents`` bytes.

Raw data is little-endian and row-major; a BYTES tensor's raw data is each element preceded by
its length as a 4-byte little-endian unsigned integer (the protocol's own encoding).
"""

from __future__ import annotations

import struct

import numpy as np

from explainserve._generated import grpc_predict_v2_pb2 as oip

# datatype -> (numpy dtype, InferTensorContents field)
DATATYPES = {
    "BOOL": (np.dtype(bool), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"), "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"), "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"), "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"), "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"), "FP64": (np.dtype("<f8"), "fp64_contents"),
}
NUMPY_DATATYPES = {dtype: name for name, (dtype, _) in DATATYPES.items()}


def parameter_value(parameter: oip.InferParameter):
    """The Python value of an InferParameter (bool, int, str or float); None when unset."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def split_bytes(raw: bytes, what: str) -> list[bytes]:
    """The elements of a raw BYTES tensor (length-prefixed)."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError(f"{what}: raw BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ValueError(f"{what}: raw BYTES element of {size} bytes runs past the data's end")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def input_array(tensor, raw: bytes | None, what: str):
    """An input's data: a numpy array of its shape, or for BYTES a list of bytes (row-major).

    Raises ValueError naming ``what`` for an unknown datatype, a negative dimension, or data
    whose size does not match the shape.
    """
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}.shape: dimensions must be >= 0, got {list(shape)}")
    count = int(np.prod(shape)) if shape else 1
    if tensor.datatype == "BYTES":
        items = split_bytes(raw, what) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise ValueError(f"{what}: shape {list(shape)} needs {count} BYTES elements, got {len(items)}")
        return items
    if tensor.datatype not in DATATYPES:
        raise ValueError(f"{what}.datatype: expected one of {['BYTES', *DATATYPES]}, got {tensor.datatype!r}")
    dtype, field = DATATYPES[tensor.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"{what}: shape {list(shape)} of {tensor.datatype} needs {count * dtype.itemsize} "
                             f"raw bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise ValueError(f"{what}: shape {list(shape)} needs {count} values in contents.{field}, got {len(values)}")
    return np.asarray(values).astype(dtype).reshape(shape)


def output_tensor(name: str, values) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    """An output tensor and its raw data: ``values`` a numpy array, or a list of str/bytes (BYTES, 1-D)."""
    if isinstance(values, list):
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
        return oip.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=[len(items)]), raw
    array = np.ascontiguousarray(values)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    datatype = NUMPY_DATATYPES[array.dtype]
    return oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape)), array.tobytes()
