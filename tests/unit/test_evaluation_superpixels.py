import numpy as np
import pytest
import torch

from explainserve.evaluation import superpixel_removal, top_k_agreement
from support.evaluation_models import ThresholdModel


def quadrants(side=8):
    segments = np.zeros((side, side), dtype=np.int64)
    half = side // 2
    segments[:half, half:] = 1
    segments[half:, :half] = 2
    segments[half:, half:] = 3
    return segments


def test_removal_best_first_and_worst_first_by_hand():
    segments = quadrants()
    region = torch.as_tensor(segments == 0)  # the object fills quadrant 0
    model = ThresholdModel(region)
    inputs = torch.ones(1, 3, 8, 8)
    right = [np.array([9.0, 1.0, 2.0, 3.0])]
    best = superpixel_removal(model, inputs, segments[None], right, "best")
    worst = superpixel_removal(model, inputs, segments[None], right, "worst", batch_size=2)
    assert best.tolist() == [0.25] and worst.tolist() == [1.0]
    wrong = [np.array([0.0, 1.0, 2.0, 3.0])]
    assert superpixel_removal(model, inputs, segments[None], wrong, "best").tolist() == [1.0]
    assert superpixel_removal(model, inputs, segments[None], wrong, "worst").tolist() == [0.25]


def test_top_k_agreement():
    reference = [np.array([0.1, 0.9, 0.5, 0.3]), np.array([0.9, 0.1, 0.5, 0.3])]
    method = [np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0])]
    assert top_k_agreement(method, reference, 1).tolist() == [False, False]
    assert top_k_agreement(method, reference, 2).tolist() == [True, False]
    assert top_k_agreement(method, reference, 4).tolist() == [True, True]


def test_bad_input_is_refused():
    segments = quadrants()[None]
    model = ThresholdModel(torch.as_tensor(segments[0] == 0))
    inputs = torch.ones(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"segment_scores\[0\] must be 4 finite"):
        superpixel_removal(model, inputs, segments, [np.ones(3)])
    with pytest.raises(ValueError, match=r"segment_scores\[0\] must be 4 finite"):
        superpixel_removal(model, inputs, segments, [np.array([1.0, np.nan, 0, 0])])
    with pytest.raises(ValueError, match="spatial shape"):
        superpixel_removal(model, inputs, segments[:, :4], [np.ones(4)])
    with pytest.raises(ValueError, match="order"):
        superpixel_removal(model, inputs, segments, [np.ones(4)], "middle")
    with pytest.raises(ValueError, match="non-empty"):
        top_k_agreement([], [], 1)
