"""The requests the load scenarios and fault tests send: good, out-of-distribution, malformed.

Every malformed request carries the status code the gateway documents for it
(INVALID_ARGUMENT for a bad field or undecodable input, RESOURCE_EXHAUSTED for an input over
the size limits of :mod:`explainserve.inputs`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import grpc
import numpy as np

from explainserve.client import build_request, encode_png
from explainserve._generated import explain_pb2

INVALID, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Malformed:
    """A request the gateway must refuse with ``code``, leaving other traffic untouched."""

    name: str
    request: explain_pb2.ExplainRequest
    code: grpc.StatusCode


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    data = encode_png(np.zeros((16, 16, 3), np.uint8))
    header = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def malformed_requests(model: str, image: np.ndarray, n_classes: int) -> list[Malformed]:
    """Corrupt, oversize and out-of-range requests for an image ``model``.

    Parameters
    ----------
    image : uint8 (H, W, 3)
        A valid picture, corrupted or mis-parameterised in each case.
    n_classes : int
        The model's class count (for out-of-range class ids).
    """
    encoded = encode_png(image)
    cases = [
        ("truncated png", build_request(encoded[: len(encoded) // 2], model=model), INVALID),
        ("garbage bytes", build_request(b"\x00not an image\xff" * 8, model=model), INVALID),
        ("empty image", build_request(b"", model=model), INVALID),
        ("png claiming 20000x20000", build_request(png_claiming(20000, 20000), model=model), TOO_BIG),
        ("8x9000 image", build_request(np.zeros((8, 9000, 3), np.uint8), model=model), TOO_BIG),
        ("unknown method", build_request(encoded, model=model, methods=["lime"]), INVALID),
        ("n_segments 0", build_request(encoded, model=model, methods=["swag_i_g"], n_segments=0), INVALID),
        ("target out of range", build_request(encoded, model=model, target_class=n_classes), INVALID),
        ("unknown model", build_request(encoded, model=f"{model}_missing"), INVALID),
    ]
    return [Malformed(name, request, code) for name, request, code in cases]
