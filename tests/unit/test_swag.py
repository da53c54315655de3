"""SWAG's pixel sources (BMVC paper §3) by value, against plain autograd and captum."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop
from torch import nn

from explainserve.probe import probe
from explainserve.superpixels import gradient_slic
from explainserve.swag import PIXEL_SOURCES, pixel_scores, segment_means, swag

# captum warns that it sets requires_grad and hooks ReLUs: both are what this test asks of it.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SmallNet(nn.Module):
    """A plain conv stack, unlike ResNet: no residuals, max pooling, a bias in every layer."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


# Builder, target layer and an input size that gives the layer more than one position.
ARCHITECTURES = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=5), "layer4", 64),
    "small": (SmallNet, "features.7", 32),
}


def plain_pass(model, layer, x, target):
    """x, dy/dx, A and dy/dA from ordinary autograd, with a forward hook on the layer."""
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, out: kept.setdefault("a", out))
    try:
        x = x.clone().requires_grad_(True)
        logits = model(x)
    finally:
        handle.remove()
    y = logits[torch.arange(len(x)), target].sum()
    dx, da = torch.autograd.grad(y, [x, kept["a"]])
    return x.detach(), dx, kept["a"].detach(), da


def cam(a, weights, size):
    """relu(sum_k w_k A_k), resized bilinearly to the input."""
    maps = (weights[:, :, None, None] * a).sum(1, keepdim=True).clamp(min=0)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def grad_cam_pp_weights(a, g):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with the exponential-output closed form."""
    alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (alpha * g.clamp(min=0)).sum(dim=(2, 3))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_pixel_source_has_the_value_of_its_formula(architecture):
    build, layer, side = ARCHITECTURES[architecture]
    model = build().eval()
    x = torch.randn(2, 3, side, side)
    target = torch.tensor([1, 3])
    result = probe(model, x, layer=layer, target=target, vanilla_gradient=True)
    x, dx, a, da = plain_pass(model, layer, x, target)
    size = x.shape[2:]
    guided = GuidedBackprop(model).attribute(x.clone(), target=target).abs().amax(1)
    grad_cam = cam(a, da.mean(dim=(2, 3)), size)
    act_grad_cam = cam(a, (a * da).mean(dim=(2, 3)), size)
    expected = {
        "guided": guided,
        "vanilla": dx.abs().amax(1),
        "input_x_gradient": (x * dx).abs().amax(1),
        "relu_activation": F.interpolate(a.clamp(min=0).mean(1, keepdim=True), size=size, mode="bilinear",
                                         align_corners=False)[:, 0],
        "grad_cam": grad_cam,
        "guided_grad_cam": guided * grad_cam,
        "grad_cam_pp": cam(a, grad_cam_pp_weights(a, da), size),
        "act_grad_cam": act_grad_cam,
        "guided_act_grad_cam": guided * act_grad_cam,
    }
    assert set(expected) == set(PIXEL_SOURCES)
    for source, reference in expected.items():
        scores = pixel_scores(result, x, source)
        assert scores.shape == (2, side, side) and scores.dtype == np.float32, source
        assert reference.abs().max() > 0, source  # a blank reference would prove nothing
        np.testing.assert_allclose(scores, reference.numpy(), rtol=1e-4, atol=1e-7 * float(reference.abs().max()),
                                   err_msg=source)
    # The sources are different maps, not one map under several names.
    values = [pixel_scores(result, x, source) for source in expected]
    for i in range(len(values)):
        for j in range(i):
            assert not np.allclose(values[i], values[j], rtol=1e-3), (list(expected)[i], list(expected)[j])


def test_segment_means_and_swag_weighting_by_hand():
    scores = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    segments = np.array([[0, 0, 1], [0, 3, 3]])  # one single-pixel segment, no label 2
    expected = np.array([7 / 3, 3.0, 0.0, 5.5], dtype=np.float32)
    np.testing.assert_allclose(segment_means(scores, segments), expected, rtol=1e-6)
    result = swag(np.zeros((2, 3, 3)), scores, segments=segments)
    np.testing.assert_allclose(result.segment_scores, expected, rtol=1e-6)
    np.testing.assert_allclose(result.heatmap, expected[segments], rtol=1e-6)
    assert result.segments is segments


def test_swag_defaults_to_colour_and_scores_and_checks_the_score_shape():
    rng = np.random.default_rng(0)
    image, scores = rng.random((24, 24, 3)), rng.random((24, 24)).astype(np.float32)
    by_default = swag(image, scores, n_segments=12)
    np.testing.assert_array_equal(by_default.segments, gradient_slic(image, scores, variant="i_g", n_segments=12))
    from_scores = swag(image, scores, variant="g", n_segments=12, wg=5.0).segments
    np.testing.assert_array_equal(from_scores, gradient_slic(image, scores, variant="g", n_segments=12, wg=5.0))
    assert not np.array_equal(from_scores, by_default.segments)
    with pytest.raises(ValueError, match=r"scores: shape \(24, 23\) differs from the image's \(24, 24\)"):
        swag(image, scores[:, :23])


def test_pixel_scores_default_to_guided_and_name_what_a_source_needs():
    model, x = SmallNet().eval(), torch.randn(1, 3, 16, 16)
    guided_only = probe(model, x, layer="features.7")
    without_input_gradient = probe(model, x, layer="features.7", input_gradient=False)
    np.testing.assert_array_equal(pixel_scores(guided_only, x), pixel_scores(guided_only, x, "guided"))
    with pytest.raises(ValueError, match=r"source: expected one of \['act_grad_cam', .*'vanilla'\], got 'sobel'"):
        pixel_scores(guided_only, x, "sobel")
    for source in ("vanilla", "input_x_gradient"):
        with pytest.raises(ValueError, match=rf"source: '{source}' needs probe\(\.\.\., vanilla_gradient=True\)"):
            pixel_scores(guided_only, x, source)
    for source in ("guided", "guided_grad_cam", "guided_act_grad_cam"):
        with pytest.raises(ValueError, match=rf"source: '{source}' needs probe\(\.\.\., input_gradient=True\)"):
            pixel_scores(without_input_gradient, x, source)
    # A source that needs neither gradient takes a pass without them.
    for source in ("grad_cam", "grad_cam_pp", "relu_activation", "act_grad_cam"):
        assert pixel_scores(without_input_gradient, x, source).shape == (1, 16, 16)
