import numpy as np
import pytest

from explainserve.evaluation import THRESHOLDS, pointing_game, weak_localisation
from explainserve.evaluation.localisation import box_iou, largest_region_box, threshold_masks


def box_map(shape, box, value=1.0):
    explanation = np.zeros(shape)
    y0, x0, y1, x1 = box
    explanation[..., y0:y1, x0:x1] = value
    return explanation


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 4, 4), (4, 4, 8, 8)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_largest_region_box_picks_the_bigger_blob_half_open():
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:3, 1:3] = True
    mask[10:15, 4:12] = True
    assert largest_region_box(mask) == (10, 4, 15, 12)
    assert largest_region_box(np.zeros((5, 5), dtype=bool)) is None


def test_threshold_families_sizes_and_energy_by_hand():
    explanation = np.zeros((4, 4))
    explanation[0, 0] = 3.0
    explanation[1, 1] = explanation[2, 2] = 1.0
    for family, count in (("value", 20), ("mean", 21), ("energy", 20)):
        assert threshold_masks(explanation, family).shape == (count, 4, 4)
    # Normalised: 1, 1/3, 1/3 (total 5/3). The top pixel holds 60 % of the energy.
    energy = threshold_masks(explanation, "energy")
    levels = list(THRESHOLDS["energy"])
    assert energy[levels.index(0.0)].sum() == 1
    assert energy[levels.index(0.6)].sum() == 1
    assert energy[levels.index(0.65)].sum() == 2
    value = threshold_masks(explanation, "value")
    assert value[0].all() and value[list(THRESHOLDS["value"]).index(0.35)].sum() == 1
    mean = threshold_masks(explanation, "mean")  # mean of the normalised map = (5/3)/16
    assert mean[list(THRESHOLDS["mean"]).index(2.0)].sum() == 3
    assert mean[list(THRESHOLDS["mean"]).index(9.0)].sum() == 1
    assert mean[list(THRESHOLDS["mean"]).index(10.0)].sum() == 0  # above the maximum: no box


def test_exact_box_explanation_localises_and_random_does_not():
    rng = np.random.default_rng(0)
    boxes = np.array([[4, 6, 14, 20], [10, 2, 30, 12], [0, 0, 8, 8]])
    exact = np.stack([box_map((32, 32), box) for box in boxes])
    noise = rng.random((3, 32, 32))
    for family in THRESHOLDS:
        good = weak_localisation(exact, boxes, family)
        assert good.best_error == 0.0
        assert good.iou.shape == (3, len(THRESHOLDS[family]))
        assert weak_localisation(noise, boxes, family).best_error > 0.0


def test_clip_localisation_averages_frame_iou():
    boxes = np.array([[[2, 2 + t, 10, 10 + t] for t in range(4)]])
    tracking = np.stack([box_map((16, 16), box) for box in boxes[0]])[None]
    result = weak_localisation(tracking, boxes, "value")
    assert result.best_error == 0.0
    # Only frame 0 right: IoU 1 there; frames 1..3 overlap the frame-0 box by 7/9, 6/10, 5/11 wide.
    frozen = np.stack([box_map((16, 16), boxes[0, 0])] * 4)[None]
    expected = np.mean([1.0, 56 / 72, 48 / 80, 40 / 88])
    assert weak_localisation(frozen, boxes, "value").iou[0, 5] == pytest.approx(expected)


def test_pointing_game_tolerance_in_pixels():
    mask = np.zeros((1, 40, 40), dtype=bool)
    mask[0, 20:30, 20:30] = True
    explanation = np.zeros((1, 40, 40))
    explanation[0, 20, 5] = 1.0  # 15 px left of the mask
    assert pointing_game(explanation, mask, tolerance=15).tolist() == [True]
    assert pointing_game(explanation, mask, tolerance=14.9).tolist() == [False]
    assert pointing_game(mask.astype(float), mask, tolerance=0).tolist() == [True]


def test_bad_input_is_refused():
    boxes = np.array([[0, 0, 4, 4]])
    with pytest.raises(ValueError, match="NaN"):
        weak_localisation(np.full((1, 8, 8), np.nan), boxes)
    with pytest.raises(ValueError, match="empty"):
        weak_localisation(np.zeros((0, 8, 8)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="boxes must have shape"):
        weak_localisation(np.zeros((2, 8, 8)), boxes)
    with pytest.raises(ValueError, match="half-open"):
        weak_localisation(np.zeros((1, 8, 8)), np.array([[0, 0, 4, 9]]))
    with pytest.raises(ValueError, match="family"):
        weak_localisation(np.zeros((1, 8, 8)), boxes, "median")
    with pytest.raises(ValueError, match="spatial shape"):
        pointing_game(np.zeros((1, 8, 8)), np.ones((1, 8, 9), dtype=bool))
    with pytest.raises(ValueError, match="sample 0 is empty"):
        pointing_game(np.zeros((1, 8, 8)), np.zeros((1, 8, 8), dtype=bool))
