"""Decoding and checking of client images and clips, before any network runs.

Used by the gateway (to refuse bad requests itself) and by the handlers (for plain
TorchServe requests). Errors are ``ValueError`` naming what was wrong; inputs that are too
big raise :class:`InputTooLarge`, a ``ValueError`` the gateway maps to RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MIN_SIDE = 8          # pixels; smaller images carry no usable content
MAX_SIDE = 8192       # pixels
MAX_PIXELS = 4096 * 4096
MAX_FRAMES = 256


class InputTooLarge(ValueError):
    """The input is larger than the service accepts."""


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Raise if a width x height picture is outside [MIN_SIDE, MAX_SIDE] or MAX_PIXELS."""
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputTooLarge(
            f"{what} is {width}x{height} pixels; the limit is {MAX_SIDE} per side and {MAX_PIXELS} pixels"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"{what} is {width}x{height} pixels; each side must be at least {MIN_SIDE}")


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode a JPEG or PNG into an RGB uint8 array of shape (H, W, 3).

    The header is read and the size checked before the pixels are decoded, so a small file
    that claims a huge size is refused without allocating it.
    """
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            if picture.format not in ("JPEG", "PNG"):
                raise ValueError(f"{what} is {picture.format}; only JPEG and PNG are accepted")
            check_image_size(*picture.size, what=what)
            return np.array(picture.convert("RGB"), dtype=np.uint8)  # writable, as torch.from_numpy wants
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputTooLarge(f"{what} is too large to decode: {error}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what} is not a JPEG or PNG image") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{what} is not a decodable JPEG or PNG: {error}") from None


def decode_frames(frames: list[bytes]) -> np.ndarray:
    """Decode encoded frames into a (T, H, W, 3) uint8 clip; all frames must share a size."""
    if not frames:
        raise ValueError("clip has no frames")
    if len(frames) > MAX_FRAMES:
        raise InputTooLarge(f"clip has {len(frames)} frames; the limit is {MAX_FRAMES}")
    decoded = [decode_image(frame, what=f"clip frame {i}") for i, frame in enumerate(frames)]
    sizes = {frame.shape for frame in decoded}
    if len(sizes) != 1:
        raise ValueError(f"clip frames differ in size: {sorted(sizes)}")
    return np.stack(decoded)


def raw_clip(data: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """View raw uint8 bytes as a (T, H, W, 3) clip after checking shape and length."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"clip shape must be [T, H, W, 3], got {list(shape)}")
    frames, height, width, _ = shape
    if frames < 1:
        raise ValueError(f"clip shape has {frames} frames; at least 1 is needed")
    if frames > MAX_FRAMES:
        raise InputTooLarge(f"clip has {frames} frames; the limit is {MAX_FRAMES}")
    check_image_size(width, height, what="clip frame")
    if len(data) != frames * height * width * 3:
        raise ValueError(f"clip raw data has {len(data)} bytes; shape {list(shape)} needs {frames * height * width * 3}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()  # writable, as torch.from_numpy wants
