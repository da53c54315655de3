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
