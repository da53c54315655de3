"""Reading IDX files, the binary format of (Fashion-)MNIST, plain or gzip-compressed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# IDX magic: two zero bytes, a type code, then the number of dimensions.
_UNSIGNED_BYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file into an array.

    Parameters
    ----------
    path
        An ``*-idx?-ubyte`` file, optionally gzip-compressed (``.gz``).

    Returns
    -------
    numpy.ndarray
        uint8 array of the shape stored in the header, e.g. (N, 28, 28) for images or (N,)
        for labels.

    Raises
    ------
    ValueError
        If the file is not an unsigned-byte IDX file or its payload length disagrees with the
        header; the message names the file and the mismatch.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"{path}: cannot read IDX file: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r})")
    if raw[2] != _UNSIGNED_BYTE:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_end:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    payload = len(raw) - header_end
    if payload != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds {payload} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)
