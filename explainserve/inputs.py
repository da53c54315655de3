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
# Decoded pixels of one request, all frames together: 48 MiB as RGB uint8 (192 MiB as the float32
# the network input is resized from). Checked from the headers before anything is decoded.
MAX_REQUEST_PIXELS = 4096 * 4096


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


def check_frame_count(count: int, expected: int | None = None) -> None:
    """Raise unless a clip's ``count`` frames are in [1, MAX_FRAMES] and, when given, ``expected``."""
    if count < 1:
        raise ValueError("clip has no frames")
    if count > MAX_FRAMES:
        raise InputTooLarge(f"clip has {count} frames; the limit is {MAX_FRAMES}")
    if expected is not None and count != expected:
        raise ValueError(f"clip: the model takes {expected} frames, got {count}")


def check_request_pixels(frames: int, width: int, height: int, what: str) -> None:
    """Raise InputTooLarge if ``frames`` pictures of width x height exceed MAX_REQUEST_PIXELS."""
    total = frames * width * height
    if total > MAX_REQUEST_PIXELS:
        raise InputTooLarge(f"{what} is {frames} x {width}x{height} = {total} pixels decoded; "
                            f"the limit is {MAX_REQUEST_PIXELS} pixels a request")


# Pillow opens a 16-bit greyscale PNG in one of these modes, and its conversion to RGB clips at 255
# (every level above the 256th darkest of 65,536 turns white); decode_image keeps the high byte
# instead, which is what Pillow itself does with a 16-bit colour PNG.
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open_picture(data: bytes, what: str) -> Image.Image:
    """The JPEG or PNG in ``data`` with only its header read, its size checked."""
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputTooLarge(f"{what} is too large to decode: {error}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what} is not a JPEG or PNG image") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{what} is not a decodable JPEG or PNG: {error}") from None
    if picture.format not in ("JPEG", "PNG"):
        raise ValueError(f"{what} is {picture.format}; only JPEG and PNG are accepted")
    check_image_size(*picture.size, what=what)
    return picture


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """(width, height) of a JPEG or PNG from its header, checked as :func:`decode_image` checks
    it; no pixel is decoded."""
    return _open_picture(data, what).size


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode a JPEG or PNG into an RGB uint8 array of shape (H, W, 3).

    Greyscale, palette and alpha pictures become RGB (alpha dropped); 16-bit PNGs keep the high
    byte of each level (:data:`SIXTEEN_BIT_GREY`). EXIF orientation is not applied, as
    torchvision's ImageFolder loader does not apply it.

    The header is read and the size checked before the pixels are decoded, so a small file
    that claims a huge size is refused without allocating it.
    """
    picture = _open_picture(data, what)
    try:
        if picture.mode in SIXTEEN_BIT_GREY:
            grey = (np.asarray(picture).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.array(picture.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{what} is not a decodable JPEG or PNG: {error}") from None


def check_frames(frames: list[bytes], expected: int | None = None) -> tuple[int, int]:
    """Check an encoded clip from its frames' headers alone: the frame count (``expected`` when
    given), each frame's size, one size for all, and the request's decoded pixels.

    Returns
    -------
    (width, height) of the frames.
    """
    check_frame_count(len(frames), expected)
    sizes = [image_size(frame, what=f"clip frame {i}") for i, frame in enumerate(frames)]
    for index, size in enumerate(sizes):
        if size != sizes[0]:
            raise ValueError(f"clip frames differ in size: frame 0 is {sizes[0][0]}x{sizes[0][1]}, "
                             f"frame {index} is {size[0]}x{size[1]}")
    check_request_pixels(len(frames), *sizes[0], what="clip")
    return sizes[0]


def decode_frames(frames: list[bytes], expected: int | None = None) -> np.ndarray:
    """Decode encoded frames into a (T, H, W, 3) uint8 clip, after :func:`check_frames`."""
    width, height = check_frames(frames, expected)
    clip = np.empty((len(frames), height, width, 3), np.uint8)  # filled in place: no second copy to stack
    for index, frame in enumerate(frames):
        clip[index] = decode_image(frame, what=f"clip frame {index}")
    return clip


def check_raw_clip(length: int, shape: list[int] | tuple[int, ...], expected: int | None = None) -> tuple[int, ...]:
    """Check a raw clip's ``shape`` (frames, ``expected`` when given, sizes, decoded pixels) and
    its ``length`` in bytes; returns the shape as a tuple of ints."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"clip shape must be [T, H, W, 3], got {list(shape)}")
    frames, height, width, _ = shape
    if frames < 1:
        raise ValueError(f"clip shape has {frames} frames; at least 1 is needed")
    check_frame_count(frames, expected)
    check_image_size(width, height, what="clip frame")
    check_request_pixels(frames, width, height, what="clip")
    if length != frames * height * width * 3:
        raise ValueError(f"clip raw data has {length} bytes; shape {list(shape)} needs {frames * height * width * 3}")
    return shape


def raw_clip(data: bytes, shape: list[int] | tuple[int, ...], expected: int | None = None) -> np.ndarray:
    """View raw uint8 bytes as a (T, H, W, 3) clip after :func:`check_raw_clip`: a read-only view
    of ``data``, not a copy (the Explainer copies while it converts to float)."""
    shape = check_raw_clip(len(data), shape, expected)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
