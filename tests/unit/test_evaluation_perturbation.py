import pytest
import torch

from explainserve.evaluation import curve_auc, deletion_auc, insertion_auc, perturbation_curves
from explainserve.evaluation.perturbation import removal_order
from support.evaluation_models import PresenceModel

SIDE = 28  # 784 pixels, 28 steps of 28 pixels: curves are exactly linear


def object_region():
    region = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    region[:7, :] = True  # 196 pixels = 7 steps of 28
    return region


def test_curve_auc_trapezoid_formula():
    assert curve_auc([1.0, 0.5, 0.0]).item() == pytest.approx(0.5)
    assert curve_auc([[1.0, 1.0], [0.0, 1.0]]).tolist() == pytest.approx([1.0, 0.5])
    assert curve_auc([0.2, 0.9, 0.4, 0.7]).item() == pytest.approx((0.2 + 0.9 + 0.4 + 0.7 - 0.1 - 0.35) / 3)


def test_constant_explanation_gives_the_analytic_auc():
    model = PresenceModel()
    inputs = torch.ones(2, 1, SIDE, SIDE)
    constant = torch.full((2, SIDE, SIDE), 0.3)
    deletion = perturbation_curves(model, inputs, constant, "deletion")
    assert deletion[0].tolist() == pytest.approx([1 - k / 28 for k in range(29)])
    assert deletion_auc(model, inputs, constant).tolist() == pytest.approx([0.5, 0.5])
    assert insertion_auc(model, inputs, constant).tolist() == pytest.approx([0.5, 0.5])


def test_true_mask_beats_random_with_the_expected_values():
    region = object_region()
    model = PresenceModel(region)
    inputs = torch.ones(1, 1, SIDE, SIDE)
    mask_map = region.float().unsqueeze(0)
    random_map = torch.rand(1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    # The object is 7 steps: deletion falls linearly to 0 in 7 steps, insertion rises in 7.
    assert deletion_auc(model, inputs, mask_map).item() == pytest.approx(7 / 56)
    assert insertion_auc(model, inputs, mask_map).item() == pytest.approx(1 - 7 / 56)
    assert deletion_auc(model, inputs, random_map).item() > 0.4
    assert insertion_auc(model, inputs, random_map).item() < 0.6


def test_clip_curves_rank_voxels():
    model = PresenceModel()
    inputs = torch.ones(1, 3, 4, 7, 7)
    curve = perturbation_curves(model, inputs, torch.rand(1, 4, 7, 7), "deletion", batch_size=5)
    assert curve.shape == (1, 29)
    assert curve[0, 0].item() == pytest.approx(1.0) and curve[0, -1].item() == pytest.approx(0.0)


def test_removal_order_is_descending_and_stable_on_ties():
    ranks = removal_order(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]))
    assert ranks.tolist() == [[[3, 0], [1, 2]]]


@pytest.mark.parametrize(
    "maps, message",
    [
        (torch.zeros(2, SIDE, SIDE - 1), "spatial shape"),
        (torch.zeros(3, SIDE, SIDE), "samples"),
        (torch.full((2, SIDE, SIDE), float("nan")), "NaN"),
    ],
)
def test_bad_maps_are_refused(maps, message):
    with pytest.raises(ValueError, match=message):
        deletion_auc(PresenceModel(), torch.ones(2, 1, SIDE, SIDE), maps)


def test_empty_batch_bad_mode_and_steps_are_refused():
    model = PresenceModel()
    with pytest.raises(ValueError, match="empty"):
        deletion_auc(model, torch.ones(0, 1, SIDE, SIDE), torch.zeros(0, SIDE, SIDE))
    with pytest.raises(ValueError, match="mode"):
        perturbation_curves(model, torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4), "erase")
    with pytest.raises(ValueError, match=r"n_steps must lie in \[1, 16\]"):
        perturbation_curves(model, torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4), n_steps=17)
    with pytest.raises(ValueError, match="at least 2 points"):
        curve_auc([1.0])
    with pytest.raises(ValueError, match="NaN"):
        curve_auc([1.0, float("nan")])
