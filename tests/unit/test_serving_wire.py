"""Map encoding on the wire and input decoding limits (no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from explainserve import inputs, wire


def test_quantised_maps_are_within_half_a_step():
    values = np.random.default_rng(0).normal(size=(13, 17)).astype(np.float32)
    tensor = wire.quantized_tensor(values)
    decoded = wire.to_numpy(tensor)
    assert tensor.scale == pytest.approx((values.max() - values.min()) / 255)
    assert np.abs(decoded - values).max() <= tensor.scale / 2 + 1e-6
    assert decoded.min() == pytest.approx(values.min()) and decoded.max() == pytest.approx(values.max(), rel=1e-6)


def test_constant_maps_and_exact_arrays_round_trip():
    assert np.array_equal(wire.to_numpy(wire.quantized_tensor(np.full((3, 4), 2.5))), np.full((3, 4), 2.5))
    labels = np.arange(70_000).reshape(7, 10_000)
    assert wire.exact_tensor(labels[:, :10]).dtype == wire.explain_pb2.Tensor.UINT16
    assert np.array_equal(wire.to_numpy(wire.exact_tensor(labels)), labels)
    with pytest.raises(ValueError, match="finite"):
        wire.quantized_tensor(np.array([0.0, np.nan]))


def test_raw_clip_checks_shape_and_length():
    clip = np.zeros((2, 8, 9, 3), np.uint8)
    assert inputs.raw_clip(clip.tobytes(), clip.shape).shape == clip.shape
    with pytest.raises(ValueError, match="needs 432"):
        inputs.raw_clip(b"\x00" * 10, clip.shape)
    with pytest.raises(inputs.InputTooLarge):
        inputs.raw_clip(b"", (1, 9000, 8, 3))


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def headers_only(data: bytes) -> bytes:
    """A PNG whose header is intact and whose pixel data is cut off: decoding it fails, so
    a check that answers something else about it has not decoded it."""
    return data[:64]


def test_a_clip_is_refused_from_its_headers_before_any_frame_is_decoded():
    big = headers_only(png_bytes(2048, 2048))
    # 4 frames of 2048 x 2048 = 16.8 M pixels: at the limit; 5 frames are over it
    assert inputs.check_frames([big] * 4) == (2048, 2048)
    with pytest.raises(inputs.InputTooLarge, match=rf"clip is 5 x 2048x2048 = {5 * 2048 * 2048} pixels decoded; "
                                                   rf"the limit is {inputs.MAX_REQUEST_PIXELS}"):
        inputs.decode_frames([big] * 5)
    with pytest.raises(ValueError, match="clip: the model takes 4 frames, got 5"):
        inputs.decode_frames([big] * 5, expected=4)
    with pytest.raises(inputs.InputTooLarge, match="clip has 257 frames; the limit is 256"):
        inputs.decode_frames([headers_only(png_bytes(8, 8))] * 257)
    with pytest.raises(ValueError, match="clip frames differ in size: frame 0 is 2048x2048, frame 1 is 8x8"):
        inputs.decode_frames([big, headers_only(png_bytes(8, 8))])
    with pytest.raises(ValueError, match="clip frame 0 is not a decodable JPEG or PNG"):
        inputs.decode_frames([big] * 4)  # within the limits: only now is a frame decoded
    with pytest.raises(inputs.InputTooLarge, match="clip is 2 x 4096x4096"):
        inputs.raw_clip(b"", (2, 4096, 4096, 3))
    with pytest.raises(ValueError, match="the model takes 3 frames, got 2"):
        inputs.check_raw_clip(2 * 8 * 8 * 3, (2, 8, 8, 3), expected=3)


def test_decoded_clip_and_image_sizes():
    frames = [png_bytes(12, 10, seed) for seed in range(3)]
    clip = inputs.decode_frames(frames, expected=3)
    assert clip.shape == (3, 10, 12, 3) and clip.flags.writeable
    for frame, decoded in zip(frames, clip):
        np.testing.assert_array_equal(decoded, inputs.decode_image(frame))
    assert inputs.image_size(headers_only(png_bytes(40, 30))) == (40, 30)
    with pytest.raises(inputs.InputTooLarge, match="image is 9000x8 pixels"):
        inputs.image_size(headers_only(png_bytes(9000, 8)))


def png_16_bit(levels: np.ndarray) -> bytes:
    """A PNG of bit depth 16, written by hand (Pillow writes none): ``levels`` (H, W) uint16 is
    greyscale (colour type 0), (H, W, 3) RGB (colour type 2)."""
    import struct
    import zlib

    height, width = levels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in levels)  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if levels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_pngs_keep_their_high_byte_rather_than_clipping():
    levels = np.linspace(0, 65535, 60).astype(np.uint16)[None].repeat(8, axis=0)  # a grey ramp, 8 x 60
    grey = inputs.decode_image(png_16_bit(levels))
    assert grey.shape == (8, 60, 3) and grey.dtype == np.uint8 and grey.flags.writeable
    # Pillow's own conversion would turn every level from 256 on white: 59 of these 60 columns.
    np.testing.assert_array_equal(grey, np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, axis=2))
    colour = np.stack([levels, levels[:, ::-1], np.full_like(levels, 40_000)], axis=2)
    np.testing.assert_array_equal(inputs.decode_image(png_16_bit(colour)), (colour >> 8).astype(np.uint8))
