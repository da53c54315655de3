import numpy as np
import pytest
import torch
from torch import nn

from bench.baselines import (
    CAM_METHODS,
    CamBaseline,
    LimeBaseline,
    QuickshiftSegmenter,
    centre_map,
    guided_backprop,
    integrated_gradients,
    random_map,
)
from support.evaluation_models import PresenceModel


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_cam_baselines_give_one_normalised_map_per_image(method):
    model = small_cnn()
    inputs = torch.randn(2, 3, 10, 10)
    maps = CamBaseline(method, "2", batch_size=4)(model, inputs, torch.tensor([0, 2]))
    assert maps.shape == (2, 10, 10) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # The hooks are released: the model is left as it was.
    assert not model[2]._forward_hooks and not model[2]._backward_hooks


def test_cam_baseline_refuses_unknown_methods():
    with pytest.raises(ValueError, match="method must be one of"):
        CamBaseline("eigen_cam", "2")


def test_integrated_gradients_of_a_linear_model_is_input_times_weight():
    weight = torch.randn(2, 3 * 4 * 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2, bias=False))
    model[1].weight.data = weight
    inputs = torch.randn(1, 3, 4, 4)
    expected = (inputs * weight[1].view(1, 3, 4, 4)).abs().amax(dim=1).numpy()
    assert np.allclose(integrated_gradients(model, inputs, torch.tensor([1])), expected, atol=1e-5)


def test_guided_backprop_shape_and_sign():
    maps = guided_backprop(small_cnn(), torch.randn(2, 3, 10, 10), torch.tensor([1, 1]))
    assert maps.shape == (2, 10, 10) and (maps >= 0).all()


def test_lime_ranks_the_superpixel_the_model_looks_at_first():
    segments = np.zeros((16, 16), dtype=np.int64)
    segments[:, 8:] = 1
    segments[8:, :8] = 2
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[8:, :8] = True  # the model counts only segment 2
    lime = LimeBaseline(100, lambda model, inputs, target: np.stack([segments] * len(inputs)), batch_size=50)
    model = PresenceModel(region)
    inputs = torch.ones(2, 3, 16, 16)
    scores = lime.segment_scores(model, inputs, torch.tensor([0, 0]), np.stack([segments] * 2))
    assert [int(np.argmax(s)) for s in scores] == [2, 2]
    maps = lime(model, inputs, torch.tensor([0, 0]))
    assert maps.shape == (2, 16, 16) and np.allclose(maps[0][segments == 2], scores[0][2])


def test_quickshift_segments_are_sequential_labels():
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    segmenter = QuickshiftSegmenter(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), kernel_size=1)
    segments = segmenter(None, image * 2 - 1, None)
    assert segments.shape == (1, 24, 24)
    assert set(np.unique(segments)) == set(range(segments.max() + 1)) and segments.max() >= 3


def test_random_and_centre_baselines():
    inputs = torch.zeros(2, 3, 5, 9, 11)
    centre = centre_map(None, inputs, None)
    assert centre.shape == (2, 5, 9, 11)
    assert np.unravel_index(np.argmax(centre[0, 0]), (9, 11)) == (4, 5)
    assert np.array_equal(random_map(None, inputs, None, seed=3), random_map(None, inputs, None, seed=3))


def test_the_evaluations_batches_and_channels_last_leave_its_numbers_as_they_were():
    # bench/evaluate.py runs its perturbation metrics 256 inputs a pass on channels-last images and
    # LIME 256 samples a pass: the curves must be those of the library's defaults (64 a pass,
    # contiguous), bit for bit for the batch size, to float32 rounding for the layout.
    from bench.eval_sections import PERTURBATION_BATCH
    from bench.eval_subjects import ChannelsLast
    from explainserve.evaluation import filter_removal_correct, perturbation_curves
    from explainserve.models.architectures import FashionVGG

    torch.manual_seed(0)
    model = FashionVGG(num_classes=8).eval()
    inputs, maps = torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32)  # 87 curve points: two passes of 64
    target = torch.arange(3)
    for mode in ("deletion", "insertion"):
        default = perturbation_curves(model, inputs, maps, mode, target=target)
        batched = perturbation_curves(model, inputs, maps, mode, target=target, batch_size=PERTURBATION_BATCH)
        assert torch.equal(batched, default)
        fast = perturbation_curves(ChannelsLast(model), inputs, maps, mode, target=target, batch_size=PERTURBATION_BATCH)
        torch.testing.assert_close(fast, default, rtol=0, atol=1e-5)
    scores = torch.randn(3, 128)  # FashionVGG: 128 filters at its target layer
    layer = model.get_submodule(model.target_layer)
    default = filter_removal_correct(model, layer, inputs, target, scores)
    fast = filter_removal_correct(ChannelsLast(model), layer, inputs, target, scores, batch_size=PERTURBATION_BATCH)
    assert torch.equal(fast[1], default[1])

    segments = np.stack([np.arange(32 * 32).reshape(32, 32) // 128] * 2)  # 8 horizontal bands
    lime_default = LimeBaseline(60, None, batch_size=16).segment_scores(model, inputs[:2], target[:2], segments)
    lime_fast = LimeBaseline(60, None).segment_scores(model, inputs[:2], target[:2], segments)
    for fast_scores, default_scores in zip(lime_fast, lime_default):
        np.testing.assert_allclose(fast_scores, default_scores, rtol=1e-4, atol=1e-6)
