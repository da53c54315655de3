"""The region that triggered one filter (thesis 6.3.2): gradients, regions, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from explainserve.explainer import Explainer
from explainserve.probe import probe
from explainserve.surprise import FilterRegion, filter_regions, suppress_surprise


def _reference_filter_gradient(model, layer, x, targets, filters):
    """d/dx of sum_b (A[b, n_b] * G[b, n_b]).sum(), G = dy_c/dA detached, with plain autograd."""
    captured = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: captured.setdefault("A", out))
    try:
        x = x.clone().requires_grad_(True)
        logits = model(x)
    finally:
        handle.remove()
    rows = torch.arange(x.shape[0])
    activations = captured["A"]
    (gradients,) = torch.autograd.grad(logits[rows, targets].sum(), [activations], retain_graph=True)
    selected = torch.tensor(filters)
    objective = (activations[rows, selected] * gradients[rows, selected].detach()).sum()
    (reference,) = torch.autograd.grad(objective, [x])
    return reference


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=6).eval()


def _smooth_images(batch, size=64, seed=0):
    """Blocky RGB images with visible structure, so SLIC finds many segments."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((batch, 3, 8, 8)).astype(np.float32)
    return torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="nearest")


def test_filter_gradient_equals_autograd_through_that_filter_only(resnet):
    x = _smooth_images(3) * 2 - 1
    targets, filters = [1, 4, 1], [7, 300, 511]
    reference = _reference_filter_gradient(resnet, "layer4", x, targets, filters)
    assert reference.abs().max() > 0
    # Also from a guided pass: the filter backward must switch the guided ReLUs off.
    for input_gradient in (False, True):
        result = probe(resnet, x, target=targets, filters=filters, input_gradient=input_gradient)
        torch.testing.assert_close(result.filter_gradient, reference, rtol=1e-4, atol=1e-7)
        assert result.filters.tolist() == filters
    guided = probe(resnet, x, target=targets, input_gradient=True).input_gradient
    assert not torch.allclose(guided, reference)

    regions = filter_regions(resnet, x, filters, target=targets, images=((x + 1) / 2).movedim(1, -1).numpy())
    for b, region in enumerate(regions):
        scores = reference[b].abs().amax(dim=0).numpy()
        np.testing.assert_allclose(region.pixel_scores, scores, rtol=1e-4, atol=1e-7)
        means = np.array([scores[region.segments == s].mean() for s in range(region.segments.max() + 1)])
        np.testing.assert_allclose(region.segment_scores, means, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(region.heatmap, means[region.segments], rtol=1e-4, atol=1e-9)
        assert region.top_segment == int(np.argmax(means)) and region.mask.sum() > 0
        assert (region.filter, region.target) == (filters[b], targets[b])
        assert region.segments.dtype == np.int32 and 20 <= region.segments.max() + 1 <= 80


class ColourDetector(nn.Module):
    """Filter 0 fires on red pixels, filter 1 on blue ones; a ReLU lies below the target layer.

    ``stem`` passes the colours through a ReLU, so a guided backward (which drops the negative
    weights on the other colours) differs from the vanilla one the region must use.
    """

    def __init__(self, conv=nn.Conv2d, kernel=(3, 3)):
        super().__init__()
        self.stem = conv(3, 3, 1)
        self.detect = conv(3, 2, kernel, padding=tuple(k // 2 for k in kernel))
        self.head = nn.Linear(2, 2)
        self.target_layer = "detect"
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(3).reshape(3, 3, *(1,) * len(kernel)))
            self.stem.bias.zero_()
            size = float(np.prod(kernel))
            colour = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]) / size  # red, blue
            self.detect.weight.copy_(colour.reshape(2, 3, *(1,) * len(kernel)).expand_as(self.detect.weight))
            self.detect.bias.fill_(-0.3)
            self.head.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        features = torch.relu(self.detect(torch.relu(self.stem(x))))
        return self.head(features.flatten(2).mean(dim=2))


def _two_patch_scene(shape=(64, 64)):
    """Grey background, a red square in the top-left quadrant, a blue one bottom-right."""
    scene = np.full((*shape, 3), 0.5, np.float32)
    scene[..., 8:20, 10:22, :] = (1.0, 0.0, 0.0)
    scene[..., 40:54, 42:56, :] = (0.0, 0.0, 1.0)
    return scene


def _quadrant(mask):
    rows, cols = np.nonzero(mask.reshape(-1, *mask.shape[-2:]).any(axis=0))
    half_r, half_c = mask.shape[-2] // 2, mask.shape[-1] // 2
    return ("top" if rows.max() < half_r else "bottom" if rows.min() >= half_r else "both",
            "left" if cols.max() < half_c else "right" if cols.min() >= half_c else "both")


def test_the_region_is_where_the_filter_fires():
    model = ColourDetector().eval()
    scene = _two_patch_scene()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    regions = filter_regions(model, x, [0, 1], target=[0, 0], images=np.stack([scene, scene]))
    red, blue = regions
    assert _quadrant(red.mask) == ("top", "left")
    assert _quadrant(blue.mask) == ("bottom", "right")
    # The top segment is the patch itself: nearly all of it lies on the red square.
    assert (scene[red.mask] == (1.0, 0.0, 0.0)).all(axis=1).mean() > 0.9
    # Nothing outside the filter's receptive field of the patch gets any gradient.
    assert red.pixel_scores[30:, :].max() == 0 and blue.pixel_scores[:30, :].max() == 0


def test_clip_regions_are_supervoxels_in_the_right_frames_and_quadrant():
    model = ColourDetector(nn.Conv3d, (1, 3, 3)).eval()
    clip = np.full((4, 32, 32, 3), 0.5, np.float32)
    clip[2:, 4:12, 20:28] = (1.0, 0.0, 0.0)  # red, top-right, in the last two frames
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None]
    [region] = filter_regions(model, x, 0, target=0, images=clip[None], n_segments=20)
    assert region.segments.shape == region.heatmap.shape == (4, 32, 32)
    frames = np.nonzero(region.mask.any(axis=(1, 2)))[0]
    assert set(frames) <= {2, 3} and _quadrant(region.mask) == ("top", "right")
    reference = _reference_filter_gradient(model, "detect", x, [0], [0])
    np.testing.assert_allclose(region.pixel_scores, reference[0].abs().amax(dim=0).numpy(), rtol=1e-5, atol=1e-8)


def test_a_batch_with_a_filter_per_sample_equals_one_call_per_sample(resnet):
    x = _smooth_images(3, seed=1)
    images = x.movedim(1, -1).numpy()
    filters, targets = [3, 3, 200], [None, 5, 2]
    batched = filter_regions(resnet, x, filters, target=targets, images=images)
    for b in range(3):
        [single] = filter_regions(resnet, x[b:b + 1], filters[b], target=[targets[b]], images=images[b:b + 1])
        assert np.array_equal(single.segments, batched[b].segments)
        assert single.top_segment == batched[b].top_segment and single.target == batched[b].target
        np.testing.assert_allclose(single.segment_scores, batched[b].segment_scores, rtol=1e-4, atol=1e-9)
        assert single.alpha == pytest.approx(batched[b].alpha, rel=1e-4, abs=1e-9)
    assert batched[0].target == int(resnet(x[:1]).argmax())


def test_the_model_is_left_as_found(resnet):
    model = torchvision.models.resnet18(weights=None, num_classes=3).train()
    before = {name: module.training for name, module in model.named_modules()}
    x = _smooth_images(2)
    filter_regions(model, x, [0, 1])
    with pytest.raises(ValueError):
        filter_regions(model, x, [0, 512])
    assert {name: module.training for name, module in model.named_modules()} == before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"filters": [0, 512]}, r"filters: filter ids must be in \[0, 511\] \(layer 'layer4' has 512 filters\)"),
        ({"filters": [-1, 0]}, r"filters: filter ids must be in \[0, 511\]"),
        ({"filters": [0, 1, 2]}, r"filters: expected one filter per sample \(2\), got 3"),
        ({"filters": [0.5, 1]}, "filters: expected integer filter ids"),
        ({"filters": 0, "n_segments": 0}, r"n_segments: expected an int in \[1, 1024\]"),
        ({"filters": 0, "n_segments": 2000}, r"n_segments: expected an int in \[1, 1024\] for an input of \(64, 64\)"),
        ({"filters": 0, "n_segments": 12.5}, "n_segments"),
        ({"filters": 0, "compactness": 0.0}, r"compactness: expected a value in \(0, 1000\]"),
        ({"filters": 0, "target": 9}, r"target: class ids must be in \[0, 5\]"),
        ({"filters": 0, "images": np.zeros((2, 32, 32, 3))}, r"images: expected shape \(2, 64, 64, 3\)"),
        ({"filters": 0, "images": np.full((2, 64, 64, 3), 2.0)}, r"images: expected uint8 or float RGB values in \[0, 1\]"),
        ({"filters": 0, "segments": [np.zeros((64, 64), int)]}, r"segments: expected 2 integer label arrays of shape \(64, 64\)"),
        ({"filters": 0, "layer": "nope"}, "layer: unknown layer name 'nope'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(resnet, arguments, message):
    with pytest.raises(ValueError, match=message):
        filter_regions(resnet, _smooth_images(2), **arguments)


def test_bad_inputs_raise_value_errors(resnet):
    with pytest.raises(ValueError, match=r"inputs: expected a tensor of shape \(B, C, H, W\) or \(B, C, T, H, W\), got \(3, 64, 64\)"):
        filter_regions(resnet, torch.zeros(3, 64, 64), 0)
    with pytest.raises(ValueError, match="inputs: expected 3 channels"):
        filter_regions(resnet, torch.zeros(1, 4, 64, 64), 0, images=np.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        filter_regions(resnet, torch.full((1, 3, 64, 64), float("nan")), 0, images=np.zeros((1, 64, 64, 3)))


def test_explainer_regions_from_raw_samples(resnet):
    explainer = Explainer(resnet, kind="image", input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3,
                          class_names=[str(i) for i in range(6)])
    samples = [(_smooth_images(1, size=80, seed=s)[0].movedim(0, -1).numpy() * 255).astype(np.uint8) for s in (3, 4)]
    regions = explainer.filter_regions(samples, [10, 20], targets=[None, 3])
    prepared = explainer.prepare(samples)
    expected = filter_regions(resnet, prepared.inputs, [10, 20], target=[None, 3], images=prepared.images)
    for region, reference in zip(regions, expected):
        assert region.heatmap.shape == (64, 64) and np.array_equal(region.segments, reference.segments)
        assert region.top_segment == reference.top_segment
    with pytest.raises(ValueError, match=r"target: class id must be in \[0, 5\]"):
        explainer.filter_regions(samples, [1, 2], targets=[None, 6])
    with pytest.raises(ValueError, match=r"filters, targets: expected one entry per sample \(2\)"):
        explainer.filter_regions(samples, [1])


class LeftHalfModel(nn.Module):
    """Class 0's logit is the sum of the left half of the input, class 1's is 1: hand-computable."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].flatten(1).sum(dim=1)
        return torch.stack([left, torch.ones_like(left)], dim=1)


def _stripe_region(scores, size=8) -> FilterRegion:
    """Four vertical stripes, two columns each, labelled 0..3 from the left."""
    segments = np.repeat(np.arange(size) // 2, size).reshape(size, size).T.astype(np.int32)
    scores = np.asarray(scores, dtype=np.float32)
    return FilterRegion(filter=0, target=0, heatmap=scores[segments], pixel_scores=scores[segments], segments=segments,
                        segment_scores=scores, top_segment=int(np.argmax(scores)), alpha=1.0)


def test_suppression_deletes_the_top_segments_until_the_prediction_changes():
    model = LeftHalfModel().train()
    ones = torch.ones(2, 3, 8, 8)  # class 0's logit: 3 channels x 8 rows x 4 columns = 96
    found = suppress_surprise(model, ones, [_stripe_region([3, 2, 1, 0]), _stripe_region([0, 0, 5, 4])], steps=3)
    # Stripes 0 then 1 (the whole left half): 96 -> 48 -> 0 < 1, class 1 after the second step.
    first = found[0]
    assert first.original == 0 and first.deleted_segments.tolist() == [0, 1] and first.predicted.tolist() == [0, 1]
    assert first.changed and first.predicted_after == 1
    np.testing.assert_allclose(first.probabilities, [1 / (1 + np.exp(1 - 48)), 1 / (1 + np.exp(1))], rtol=1e-5)
    # Stripes 2, 3 (right half, no effect), then 0 (48 > 1): three steps, no change.
    second = found[1]
    assert second.deleted_segments.tolist() == [2, 3, 0] and second.predicted.tolist() == [0, 0, 0]
    assert not second.changed and second.predicted_after == 0
    assert model.training, "the model's training flag was not restored"
    # With room for a fourth step the last left stripe goes and the prediction changes.
    assert suppress_surprise(model, ones[1:], [_stripe_region([0, 0, 5, 4])], steps=10)[0].deleted_segments.tolist() == [2, 3, 0, 1]


class SaturatedLeftHalfModel(nn.Module):
    """Class 0's logit is 40, class 1's the sum of the left half: their float32 sigmoids are both
    1.0 while the logits still rank class 1 first (96 and 48 against 40)."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].flatten(1).sum(dim=1)
        return torch.stack([torch.full_like(left, 40.0), left], dim=1)


def test_multi_label_suppression_reads_predictions_from_the_logits_where_the_sigmoids_saturate():
    [found] = suppress_surprise(SaturatedLeftHalfModel(), torch.ones(1, 3, 8, 8), [_stripe_region([3, 2, 1, 0])],
                                steps=3, multi_label=True)
    # Arg-max of the sigmoids would read class 0 throughout (a tie at 1.0) and never see the change.
    assert found.original == 1 and found.deleted_segments.tolist() == [0, 1] and found.predicted.tolist() == [1, 0]
    np.testing.assert_array_equal(found.probabilities, np.float32([1.0, 0.5]))  # sigmoid(48), sigmoid(0)


def test_suppression_of_clip_regions_deletes_supervoxels():
    clip = torch.ones(1, 3, 2, 8, 8)
    region = _stripe_region([3, 2, 1, 0])
    segments = np.stack([region.segments, region.segments])  # the same stripes in both frames
    region = FilterRegion(**{**region.__dict__, "segments": segments, "heatmap": region.heatmap[None].repeat(2, 0),
                             "pixel_scores": region.pixel_scores[None].repeat(2, 0)})
    [found] = suppress_surprise(LeftHalfModel(), clip, [region])
    assert found.deleted_segments.tolist() == [0, 1] and found.predicted_after == 1


def test_suppression_rejects_bad_arguments():
    ones = torch.ones(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"steps: expected an int in \[1, 100\]"):
        suppress_surprise(LeftHalfModel(), ones, [_stripe_region([1, 0, 0, 0])], steps=0)
    with pytest.raises(ValueError, match=r"regions: expected one per sample \(1\), got 2"):
        suppress_surprise(LeftHalfModel(), ones, [_stripe_region([1, 0, 0, 0])] * 2)
    with pytest.raises(ValueError, match=r"regions: segments of shape \(8, 8\) for inputs of \(16, 16\)"):
        suppress_surprise(LeftHalfModel(), torch.ones(1, 3, 16, 16), [_stripe_region([1, 0, 0, 0])])


def test_explainer_suppression_equals_deleting_by_hand(resnet):
    explainer = Explainer(resnet, kind="image", input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3,
                          class_names=[str(i) for i in range(6)])
    samples = [(_smooth_images(1, size=64, seed=s)[0].movedim(0, -1).numpy() * 255).astype(np.uint8) for s in (5, 6)]
    regions = explainer.filter_regions(samples, [7, 30])
    found = explainer.suppress_surprise(samples, regions, steps=4)
    inputs = explainer.prepare(samples).inputs
    for b, (region, suppression) in enumerate(zip(regions, found)):
        assert suppression.deleted_segments[0] == region.top_segment
        deleted = np.isin(region.segments, suppression.deleted_segments)
        with torch.no_grad():
            by_hand = resnet(inputs[b:b + 1].masked_fill(torch.as_tensor(deleted), 0.0)).argmax(dim=1).item()
        assert by_hand == suppression.predicted_after
