import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop
from torch import nn

from explainserve.probe import ProbeResult, class_scores, input_size_failure, probe
from support.references import ModuleReLUs, guided_backprop, layer_gradient


def _guided_reference(model, x, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GuidedBackprop(model).attribute(x, target=target)


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_guided_gradient_equals_captum(architecture):
    model = getattr(torchvision.models, architecture)(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    result = probe(model, x)
    expected = _guided_reference(model, x, result.target)
    assert expected.abs().max() > 0
    assert torch.allclose(result.input_gradient, expected, rtol=1e-4, atol=1e-7)
    assert result.layer == "layer4"


class Stage(nn.Module):
    """The target block: a convolution followed by a rectifier."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = None if functional else nn.ReLU()

    def forward(self, x):
        return self.conv(x).relu_() if self.relu is None else self.relu(self.conv(x))


class ModuleReLUNet(nn.Module):
    """Reference network: every ReLU is its own nn.ReLU module (what captum's hooks see)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.stage4 = Stage(functional)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.stage4(x).mean(dim=(2, 3)))


class FunctionalReLUNet(ModuleReLUNet):
    """Same weights, but ReLUs called functionally, in place, and one module used twice."""

    def __init__(self):
        super().__init__(functional=True)
        self.shared = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.shared(self.conv1(x))
        x = F.relu(self.conv2(x), inplace=True)
        x = self.shared(self.conv3(x))
        return self.fc(self.stage4(x).mean(dim=(2, 3)))


def test_functional_inplace_and_reused_relus_are_guided():
    reference = ModuleReLUNet().eval()
    functional = FunctionalReLUNet().eval()
    functional.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(3, 3, 12, 12)
    result = probe(functional, x, layer="stage4")
    expected = _guided_reference(reference, x, result.target)
    assert torch.allclose(result.input_gradient, expected, rtol=1e-4, atol=1e-7)
    # Without the guided rule the gradient differs, so the test above can fail.
    plain = x.clone().requires_grad_()
    (vanilla,) = torch.autograd.grad(functional(plain)[torch.arange(3), result.target].sum(), plain)
    assert not torch.allclose(vanilla, expected, rtol=1e-3, atol=1e-6)


def test_vanilla_gradient_and_extra_targets_from_the_same_pass():
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    # layer4 (1 x 1 at 32 px, so not the default) feeds the GAP + linear head directly.
    result = probe(model, x, layer="layer4", vanilla_gradient=True, extra_targets=[3, None])
    plain = x.clone().requires_grad_()
    logits = model(plain)
    (vanilla,) = torch.autograd.grad(logits[torch.arange(2), result.target].sum(), plain)
    assert torch.allclose(result.vanilla_gradient, vanilla, rtol=1e-4, atol=1e-7)
    # dy/dA of the extra class through the GAP + linear head is W[class] / Z everywhere.
    z = result.activations.shape[2] * result.activations.shape[3]
    expected_extra = model.fc.weight[[3, int(result.target[1])]][:, :, None, None].expand_as(result.activations) / z
    assert torch.allclose(result.extra_activation_gradients, expected_extra, atol=1e-7)


def test_layers_after_the_target_backpropagate_normally():
    # VGG has ReLUs in its classifier, after the target layer: dy/dA must be the true gradient.
    model = torchvision.models.vgg11(weights=None, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    result = probe(model, x)
    assert result.layer == "features.19"
    captured = {}
    handle = model.features[19].register_forward_hook(lambda m, i, o: captured.setdefault("A", o))
    logits = model(x.clone().requires_grad_())
    handle.remove()
    (expected,) = torch.autograd.grad(logits[0, result.target[0]], captured["A"])
    assert torch.allclose(result.activation_gradients, expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("architecture", ["vgg11_bn", "densenet121"])
def test_guided_gradient_applies_the_rule_after_the_target_layer_too(architecture):
    # VGG's classifier has two nn.ReLUs after the target layer, DenseNet one F.relu; guided
    # backprop guides them all, while dy/dA stays the vanilla gradient.
    model = torchvision.models.get_model(architecture, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    result = probe(model, x)
    expected = guided_backprop(ModuleReLUs(model), x, result.target)
    assert torch.allclose(result.input_gradient, expected, rtol=1e-4, atol=1e-7)
    activations, gradient = layer_gradient(model, x, result.layer, result.target)
    assert torch.allclose(result.activation_gradients, gradient, rtol=1e-4, atol=1e-8)
    # A head backpropagated with the vanilla rule misses the reference: the test can fail.
    unguided_head = probe(model, x, layer=result.layer, vanilla_gradient=True).vanilla_gradient
    assert not torch.allclose(unguided_head, expected, rtol=1e-2, atol=1e-5)


def test_in_place_op_after_the_target_layer_leaves_a_and_its_gradient_exact():
    # DenseNet runs F.relu(features, inplace=True) on the target layer's output.
    model = torchvision.models.densenet121(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    for kwargs in ({}, {"input_gradient": False}):
        result = probe(model, x, **kwargs)
        activations, gradient = layer_gradient(model, x, result.layer, result.target)
        assert (activations < 0).any()  # A is the pre-ReLU map
        assert torch.equal(result.activations, activations)
        assert torch.allclose(result.activation_gradients, gradient, rtol=1e-4, atol=1e-8)


class RectifiedHeadNet(nn.Module):
    """A small network with rectifiers after its target layer ``conv2``: an in-place ``F.relu`` on
    the layer's output (as DenseNet does) and an ``nn.ReLU`` in the classifier (as VGG's)."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 16), nn.Linear(16, 4)
        self.in_place = in_place

    def forward(self, x):
        a = self.conv2(self.relu1(self.conv1(x)))
        h = F.relu(a, inplace=True) if self.in_place else self.relu2(a)
        return self.fc2(self.relu3(self.fc1(h.flatten(1))))


def test_rectifiers_after_a_small_target_layer_are_guided_and_leave_a_exact():
    # The small twin of the DenseNet and VGG-BN checks above: captum on the nn.ReLU version is
    # the guided reference; A is the pre-ReLU map, untouched by the in-place ReLU after it.
    reference = RectifiedHeadNet(in_place=False).eval()
    model = RectifiedHeadNet(in_place=True).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 4, 4)
    guided = probe(model, x, layer="conv2")
    expected = _guided_reference(reference, x, guided.target)
    assert torch.allclose(guided.input_gradient, expected, rtol=1e-4, atol=1e-7)
    for result in (guided, probe(model, x, layer="conv2", input_gradient=False)):
        activations, gradient = layer_gradient(reference, x, "conv2", result.target)
        assert (activations < 0).any() and torch.equal(result.activations, activations)
        assert torch.allclose(result.activation_gradients, gradient, rtol=1e-4, atol=1e-8)
    # Both rules matter here, so the checks above can fail: the vanilla input gradient differs,
    # and so does dy/dA through a head backpropagated with the guided rule.
    plain = x.clone().requires_grad_()
    (vanilla,) = torch.autograd.grad(model(plain)[torch.arange(3), guided.target].sum(), plain)
    assert not torch.allclose(vanilla, expected, rtol=1e-2, atol=1e-5)
    handle = reference.relu3.register_full_backward_hook(lambda _m, grad_in, _out: (grad_in[0].clamp(min=0),))
    try:
        _, guided_head = layer_gradient(reference, x, "conv2", guided.target)
    finally:
        handle.remove()
    assert not torch.allclose(guided_head, gradient, rtol=1e-2, atol=1e-6)


def test_no_hook_flag_or_gradient_is_left_behind_even_after_an_error():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    model.train()
    model.layer2.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(2, 3, 32, 32)
    probe(model, x, vanilla_gradient=True)
    with pytest.raises(ValueError, match="target"):
        probe(model, x, target=[0, 99])
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks, name
        assert module.training == flags[name], name
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # The guided ReLU mode is gone: a plain backward through the model is the vanilla one.
    assert not torch.overrides._is_torch_function_mode_enabled()


class NoGradTrunk(nn.Module):
    """A model that runs its trunk, target layer included, without autograd, and says what grad
    mode the code after the layer ran in."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)
        self.grad_mode_after_layer = []

    def forward(self, x):
        with torch.no_grad():
            a = self.act(self.conv(x))
            self.grad_mode_after_layer.append(torch.is_grad_enabled())
        return self.fc(a.mean(dim=(2, 3)))


def test_probe_leaves_the_grad_mode_of_the_models_code_alone():
    # The capture hook must not switch grad mode on for the rest of the forward pass: the
    # model's own no_grad block stays without autograd, and dy/dA is still exact; a caller's
    # no_grad does not stop the probe.
    torch.manual_seed(0)
    model, x = NoGradTrunk(), torch.randn(2, 3, 12, 12)
    result = probe(model, x, layer="act", input_gradient=False)
    with torch.no_grad():
        again = probe(model, x, layer="act", input_gradient=False)
        assert not torch.is_grad_enabled()  # the caller's mode, restored
    assert model.grad_mode_after_layer == [False, False]
    assert torch.equal(again.activation_gradients, result.activation_gradients)
    a = model.act(model.conv(x)).requires_grad_(True)
    logits = model.fc(a.mean(dim=(2, 3)))
    (expected,) = torch.autograd.grad(logits[torch.arange(2), result.target].sum(), a)
    assert torch.allclose(result.activation_gradients, expected, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())


IMAGE_ARCHITECTURES = {
    "resnet18": "layer4", "vgg11": "features.19", "densenet121": "features", "mobilenet_v2": "features",
    "mobilenet_v3_small": "features", "efficientnet_b0": "features", "convnext_tiny": "features",
}
VIDEO_ARCHITECTURES = {"r3d_18": "layer4", "mc3_18": "layer4", "r2plus1d_18": "layer4"}


@pytest.mark.parametrize("architecture,layer", IMAGE_ARCHITECTURES.items())
def test_probe_runs_on_image_architectures(architecture, layer):
    model = getattr(torchvision.models, architecture)(weights=None, num_classes=5)
    result = probe(model, torch.randn(2, 3, 64, 64))
    assert result.layer == layer
    assert result.input_gradient.shape == (2, 3, 64, 64)
    assert torch.isfinite(result.input_gradient).all() and result.input_gradient.abs().sum() > 0
    assert result.activation_gradients.shape == result.activations.shape
    assert result.activations.ndim == 4


def test_a_map_of_one_position_is_a_summary_and_never_the_target():
    # A convolution spanning its whole input (a fully connected layer written as one, as timm's
    # VGG pre_logits) gives a 1 x 1 map, over which any CAM is a constant: the map before it is the target.
    fully_connected_conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 8), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(6, 2))
    result = probe(fully_connected_conv, torch.randn(1, 3, 8, 8))
    assert result.layer == "1" and result.activations.shape == (1, 4, 8, 8)
    # A last stage the input is too small for: ResNet-18's layer4 is 1 x 1 at 32 px, layer3 2 x 2.
    result = probe(torchvision.models.resnet18(weights=None, num_classes=5), torch.randn(1, 3, 32, 32))
    assert result.layer == "layer3" and result.activations.shape[2:] == (2, 2)
    with pytest.raises(ValueError, match=r"^layer: no module outputs a spatial feature map of rank 4 with more than "
                                         r"one position before the head pools \(layers with rank-4 outputs: 0 "):
        probe(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("architecture,layer", VIDEO_ARCHITECTURES.items())
def test_probe_runs_on_video_architectures(architecture, layer):
    model = getattr(torchvision.models.video, architecture)(weights=None, num_classes=4)
    result = probe(model, torch.randn(1, 3, 8, 32, 32))
    assert result.layer == layer
    assert result.input_gradient.shape == (1, 3, 8, 32, 32)
    assert result.activations.ndim == 5 and result.input_gradient.abs().sum() > 0


@pytest.mark.parametrize(
    "inputs,kwargs,message",
    [
        (torch.randn(3, 32, 32), {}, "inputs: expected rank 4"),
        (torch.randn(1, 1, 32, 32), {}, r"^inputs: expected 3 channels \(dimension 1\), got 1$"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, "NaN or Inf"),
        (torch.randn(1, 3, 32, 32), {"layer": "layer9"}, "layer: unknown layer name 'layer9'"),
        (torch.randn(1, 3, 32, 32), {"target": 10}, r"target: class ids must be in \[0, 9\]"),
        (torch.randn(1, 3, 32, 32), {"extra_targets": 10}, r"^extra_targets: class ids must be in \[0, 9\]"),
        (torch.randint(0, 255, (1, 3, 32, 32)), {}, "floating-point"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), {}, "inputs: expected a torch.Tensor, got ndarray"),
        (torch.zeros(0, 3, 32, 32), {}, "^inputs: the batch is empty; expected at least 1 sample$"),
        (torch.full((1, 3, 32, 32), float("inf")), {}, "^inputs: contains NaN or Inf values; expected finite values$"),
        (torch.randn(1, 3, 2, 32, 32, 1), {},
         r"inputs: expected rank 4 \(B, C, H, W\) or rank 5 \(B, C, T, H, W\), got rank 6"),
    ],
)
def test_bad_input_raises_a_precise_value_error(inputs, kwargs, message):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(ValueError, match=message):
        probe(model, inputs, **kwargs)


class PointwiseNet(nn.Module):
    """1x1 convolutions only, so the guided gradient can be written by hand per pixel."""

    def __init__(self, activation: type[nn.Module]):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 1)
        self.act1, self.act2 = activation(), activation()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean(dim=(2, 3)))


class FunctionalReLU6(nn.Module):
    """ReLU6 called as ``F.relu6``, which reaches a torch function mode as itself."""

    def forward(self, x):
        return F.relu6(x)


class InPlaceFunctionalReLU6(nn.Module):
    """``F.relu6(x, inplace=True)`` with its result dropped: x itself is clipped."""

    def forward(self, x):
        F.relu6(x, inplace=True)
        return x


@pytest.mark.parametrize("activation", [nn.ReLU6, FunctionalReLU6, InPlaceFunctionalReLU6])
def test_relu6_is_guided_before_and_after_the_target_layer_by_hand(activation):
    torch.manual_seed(3)
    model = PointwiseNet(activation).eval()
    with torch.no_grad():
        model.conv1.weight.mul_(8)  # some units above 6, some below 0
    x = torch.randn(1, 2, 3, 4) * 2
    result = probe(model, x, layer="conv2", target=1)
    w1, b1 = model.conv1.weight[:, :, 0, 0].double(), model.conv1.bias.double()
    w2, b2 = model.conv2.weight[:, :, 0, 0].double(), model.conv2.bias.double()
    w3 = model.fc.weight[1].double()
    pixels = x[0].double().flatten(1)  # (2, P)
    h1 = w1 @ pixels + b1[:, None]
    h2 = w2 @ h1.clamp(0, 6) + b2[:, None]
    passes = lambda h: ((h > 0) & (h < 6)).double()  # noqa: E731 - ReLU6's derivative
    assert passes(h1).min() == 0 and (h1 > 6).any() and (h1 < 0).any()
    seed = w3[:, None].expand_as(h2) / pixels.shape[1]
    vanilla_da = seed * passes(h2)
    guided_h1 = (w2.T @ vanilla_da.clamp(min=0)) * passes(h1)
    guided_x = w1.T @ guided_h1.clamp(min=0)
    assert torch.allclose(result.activation_gradients[0].double().flatten(1), vanilla_da, atol=1e-7)
    assert torch.allclose(result.input_gradient[0].double().flatten(1), guided_x, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(result.logits, model(x), atol=1e-6)
    assert not torch.allclose(guided_x, w1.T @ ((w2.T @ vanilla_da) * passes(h1)), atol=1e-6)


# Ways of calling a clip to [0, 1] that the guided rule must see as a rectifier: positional
# arguments, keywords, in place, and max_val left to its default of 1.
CLIPS_TO_ONE = {
    "in_place_result_dropped": lambda h: (F.hardtanh(h, 0.0, 1.0, True), h)[1],
    "positional_default_max": lambda h: F.hardtanh(h, 0.0),
    "keywords_in_place": lambda h: F.hardtanh(h, min_val=0.0, inplace=True),
    "keywords_reordered": lambda h: F.hardtanh(h, max_val=1.0, min_val=0.0),
}


class PositionalCallsNet(nn.Module):
    """Rectifiers called as no module hook sees them: ``F.relu(h, True)`` with its result dropped
    (h itself is rectified) and one of ``CLIPS_TO_ONE``."""

    def __init__(self, clip):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)
        self.clip = clip

    def forward(self, x):
        h = self.conv1(x)
        F.relu(h, True)
        h = self.clip(self.conv2(h))
        return self.fc(self.conv3(h).mean(dim=(2, 3)))


@pytest.mark.parametrize("clip", sorted(CLIPS_TO_ONE))
def test_positional_in_place_relu_and_every_form_of_clip_are_guided_by_hand(clip):
    torch.manual_seed(6)
    model = PositionalCallsNet(CLIPS_TO_ONE[clip]).eval()
    with torch.no_grad():
        model.conv1.weight.mul_(4)
        model.conv2.weight.mul_(3)  # some units of the clip below 0, some above 1
    x = torch.randn(1, 2, 3, 4) * 2
    result = probe(model, x, layer="conv3", target=0)
    w1, b1 = model.conv1.weight[:, :, 0, 0].double().detach(), model.conv1.bias.double().detach()
    w2, b2 = model.conv2.weight[:, :, 0, 0].double().detach(), model.conv2.bias.double().detach()
    w3 = model.conv3.weight[:, :, 0, 0].double().detach()
    pixels = x[0].double().flatten(1)
    z1 = w1 @ pixels + b1[:, None]
    z2 = w2 @ z1.clamp(min=0) + b2[:, None]
    assert (z1 < 0).any() and (z2 < 0).any() and (z2 > 1).any() and (z2 > 0).any()
    seed = (model.fc.weight[0].double().detach() / pixels.shape[1])[:, None].expand(3, pixels.shape[1])
    g2 = (w3.T @ seed) * ((z2 > 0) & (z2 < 1))
    g1 = (w2.T @ g2.clamp(min=0)) * (z1 > 0)
    expected = w1.T @ g1.clamp(min=0)
    assert torch.allclose(result.input_gradient[0].double().flatten(1), expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(result.logits, model(x), atol=1e-6)


class ReusedInputNet(nn.Module):
    """Uses a ReLU's input again after the ReLU, as a residual block does, and calls a torch
    function with keyword arguments only."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        h = self.conv1(x)
        h = torch.cat(tensors=[torch.relu(h) + h], dim=1)
        return self.fc(self.conv2(h).mean(dim=(2, 3)))


def test_an_out_of_place_relu_leaves_its_input_alone():
    model, x = ReusedInputNet().eval(), torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        expected = model(x)
        assert (model.conv1(x) < 0).any()  # the ReLU changes something, so an in-place one would show
    assert torch.allclose(probe(model, x, layer="conv2").logits, expected, atol=1e-6)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.GELU, nn.Hardswish])
def test_smooth_activations_backpropagate_normally(activation):
    # No rectifier: the guided rule changes nothing, so the input gradient is the vanilla one.
    model = PointwiseNet(activation).eval()
    x = torch.randn(2, 2, 3, 3)
    result = probe(model, x, layer="conv2", vanilla_gradient=True)
    plain = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(plain)[torch.arange(2), result.target].sum(), plain)
    assert torch.allclose(result.input_gradient, expected, atol=1e-7)
    assert torch.allclose(result.vanilla_gradient, expected, atol=1e-7)
    # Negative gradients reach the layer, so a guided clamp would have changed the result.
    assert (result.activation_gradients < 0).any() and (result.activation_gradients > 0).any()


def test_filter_gradient_backpropagates_one_filter_by_hand():
    # 1x1 convolutions: the input gradient through filter k of conv2 alone, with vanilla ReLUs,
    # is w1^T [(w2[k] * dy/dA_k) * relu'(h1)] per pixel.
    torch.manual_seed(4)
    model = PointwiseNet(nn.ReLU).eval()
    x = torch.randn(2, 2, 3, 4)
    filters = torch.tensor([2, 0])
    differs = []
    for input_gradient in (True, False):
        result = probe(model, x, layer="conv2", target=[1, 0], filters=filters, input_gradient=input_gradient)
        assert torch.equal(result.filters, filters) and result.filters.dtype == torch.long
        w1, b1 = model.conv1.weight[:, :, 0, 0], model.conv1.bias
        w2 = model.conv2.weight[:, :, 0, 0]
        for b, k in enumerate(filters.tolist()):
            pixels = x[b].flatten(1)
            h1 = w1 @ pixels + b1[:, None]
            g = result.activation_gradients[b, k].flatten()
            expected = w1.T @ ((w2[k][:, None] * g) * (h1 > 0))
            assert torch.allclose(result.filter_gradient[b].flatten(1), expected, atol=1e-6), (input_gradient, b)
            every_filter = w1.T @ ((w2.T @ result.activation_gradients[b].flatten(1)) * (h1 > 0))
            differs.append(not torch.allclose(every_filter, expected, atol=1e-3))
    assert any(differs)  # so the test can fail: the other filters' gradient is not zero
    # The guided input gradient is left as it was without filters.
    plain = probe(model, x, layer="conv2", target=[1, 0])
    assert torch.equal(result.activation_gradients, plain.activation_gradients)
    assert probe(model, x, layer="conv2").filter_gradient is None


@pytest.mark.parametrize("filters,expected", [(1, [1, 1]), ([2], [2, 2]), (np.int64(0), [0, 0]),
                                              (torch.tensor([1, 2]), [1, 2]), ((2, np.int32(1)), [2, 1]),
                                              ([np.int32(2), np.int32(1)], [2, 1]), (np.uint8(1), [1, 1])])
def test_filters_take_one_id_per_sample_or_one_for_all(filters, expected):
    result = probe(PointwiseNet(nn.ReLU).eval(), torch.randn(2, 2, 3, 3), layer="conv2", filters=filters)
    assert result.filters.tolist() == expected and result.filters.dtype == torch.long


@pytest.mark.parametrize("filters,message", [
    (True, r"filters: expected integer filter ids, got True"),
    (torch.tensor([1.0, 2.0]), r"filters: expected integer filter ids"),
    ([1, 2.0], r"filters: expected integer filter ids, got \[1, 2.0\]"),
    ([1, False], r"filters: expected integer filter ids"),
    ([0, 1, 2], r"filters: expected one filter per sample \(2\), got 3"),
    ([3, 0], r"filters: filter ids must be in \[0, 2\] \(layer 'conv2' has 3 filters\), got \[3, 0\]"),
    (-1, r"filters: filter ids must be in \[0, 2\] \(layer 'conv2' has 3 filters\), got \[-1, -1\]"),
])
def test_bad_filters_raise_a_precise_value_error(filters, message):
    with pytest.raises(ValueError, match=message):
        # 5x5 maps: the filter count (3) is not the map's height.
        probe(PointwiseNet(nn.ReLU).eval(), torch.randn(2, 2, 5, 5), layer="conv2", filters=filters)


@pytest.mark.parametrize("target,expected", [(1, [1, 1]), ([0], [0, 0]),
                                             (torch.tensor([1, 0], dtype=torch.int32), [1, 0]),
                                             (np.array([0, 1], dtype=np.int16), [0, 1])])
def test_targets_take_one_id_per_sample_or_one_for_all(target, expected):
    result = probe(PointwiseNet(nn.ReLU).eval(), torch.randn(2, 2, 3, 3), layer="conv2", target=target)
    assert result.target.tolist() == expected and result.target.dtype == torch.long


@pytest.mark.parametrize("target,message", [
    ([0, 1, 0], r"target: expected one class per sample \(2\), got 3"),
    ([1, 2], r"target: class ids must be in \[0, 1\], got \[1, 2\]"),
    (-1, r"target: class ids must be in \[0, 1\], got \[-1, -1\]"),
])
def test_bad_targets_raise_a_precise_value_error(target, message):
    with pytest.raises(ValueError, match=message):
        probe(PointwiseNet(nn.ReLU).eval(), torch.randn(2, 2, 3, 3), layer="conv2", target=target)


def test_none_targets_take_the_predicted_class():
    model = PointwiseNet(nn.ReLU).eval()
    x = torch.randn(2, 2, 3, 3)
    predicted = probe(model, x, layer="conv2").predicted
    assert torch.equal(probe(model, x, layer="conv2", target=[None, None]).target, predicted)
    assert probe(model, x, layer="conv2", target=[None, 1 - int(predicted[1])]).target.tolist() == [
        int(predicted[0]), 1 - int(predicted[1])]
    with pytest.raises(ValueError, match=r"target: expected one class per sample \(2\), got 1"):
        probe(model, x, layer="conv2", target=[None])


def test_top_k_is_the_most_probable_classes_in_order():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 6)).eval()
    result = probe(model, torch.randn(3, 3, 2, 2), layer="0", input_gradient=False)
    # Not asked for: None, not an empty value.
    assert result.input_gradient is None and result.vanilla_gradient is None
    assert result.extra_activation_gradients is None and result.filter_gradient is None
    probabilities = result.logits.softmax(dim=1)
    assert torch.allclose(result.probabilities, probabilities)
    scores, classes = result.top_k(2)
    order = probabilities.argsort(dim=1, descending=True)
    assert torch.equal(classes, order[:, :2])
    assert torch.equal(scores, probabilities.gather(1, order[:, :2]))
    # k beyond the number of classes gives every class; k < 1 is refused.
    assert result.top_k(99)[1].shape == (3, 6) and torch.equal(result.top_k(6)[1], order)
    assert result.top_k(1)[1].shape == (3, 1)
    with pytest.raises(ValueError, match="top_k: must be >= 1, got 0"):
        result.top_k(0)
    # A multi-label model: each logit's own sigmoid, in the same order; the softmax is unchanged.
    sigmoid_scores, sigmoid_classes = result.top_k(3, multi_label=True)
    assert torch.equal(sigmoid_classes, order[:, :3])
    assert torch.equal(sigmoid_scores, torch.sigmoid(result.logits).gather(1, order[:, :3]))
    assert torch.equal(result.top_k(3, multi_label=False)[0], probabilities.gather(1, order[:, :3]))


def test_top_k_ranks_by_logit_where_float32_scores_saturate():
    # Logits 40 < 45 < 50: their sigmoids are all 1.0 in float32, and the softmax of (-200, 0, ...)
    # underflows to 0 for more than one class; the logits still order the classes.
    logits = torch.tensor([[40.0, 50.0, 45.0], [-200.0, 0.0, -300.0]])
    result = ProbeResult(logits=logits, predicted=logits.argmax(1),
                         target=logits.argmax(1), input_gradient=None, vanilla_gradient=None,
                         activations=torch.zeros(2, 1, 1, 1), activation_gradients=torch.zeros(2, 1, 1, 1),
                         extra_activation_gradients=None, layer="0")
    scores, classes = result.top_k(3, multi_label=True)
    assert classes.tolist() == [[1, 2, 0], [1, 0, 2]]
    assert scores[0].tolist() == [1.0, 1.0, 1.0]
    scores, classes = result.top_k(3)
    assert classes.tolist() == [[1, 2, 0], [1, 0, 2]]
    assert scores[1].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(scores[0].numpy(), torch.softmax(logits[0].double(), 0)[[1, 2, 0]].numpy(), rtol=1e-6)


def test_class_scores_are_the_softmax_or_each_logits_sigmoid():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    assert torch.equal(class_scores(logits), torch.softmax(logits, dim=1))
    assert torch.equal(class_scores(logits, multi_label=False), torch.softmax(logits, dim=1))
    assert torch.equal(class_scores(logits, multi_label=True), torch.sigmoid(logits))
    assert class_scores(logits, multi_label=True)[0, 0].item() == 0.5


class OddNet(nn.Module):
    """A layer the forward pass never runs, and logits of a chosen shape."""

    def __init__(self, logits_shape=(2, 3)):
        super().__init__()
        self.conv, self.unused, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)
        self.logits_shape = logits_shape

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3))).reshape(self.logits_shape)


class LogitsAndInput(nn.Sequential):
    """Returns (logits, input), as models returning auxiliary outputs do."""

    def forward(self, x):
        return super().forward(x), x


class TupleBlock(nn.Module):
    """A block that returns a tuple."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x), x


def test_bad_layers_and_logits_raise_a_precise_value_error():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="^layer: 'unused' was not executed by the forward pass$"):
        probe(OddNet(), x, layer="unused")
    with pytest.raises(ValueError, match=r"^model: returns \(2, 3, 1\) for an input of shape \(2, 3, 4, 4\); "
                                         r"explainserve serves classifiers returning logits of shape \(B, num_classes\)$"):
        probe(OddNet((2, 3, 1)), x, layer="conv")
    # Softmax over one logit is 1 for every input: a sigmoid binary classifier is refused, saying how to serve it.
    with pytest.raises(ValueError, match=r"^model: returns one logit per sample \(a sigmoid binary classifier\?\) "
                                         r"for an input of shape \(2, 3, 4, 4\); .* torch\.cat\(\[-z / 2, z / 2\], dim=1\), whose "
                                         r"softmax is the sigmoid's \(1 - p, p\), as explainserve\.models\."
                                         r"served_as_two_classes\(model\) does \(explainserve archive does it itself\)$"):
        probe(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)), x, layer="0")
    # ... and so is one whose forward flattens the one logit to (B,).
    squeezed = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))
    for batch in (x, x[:1]):
        with pytest.raises(ValueError, match=r"^model: returns one logit per sample \(a sigmoid binary classifier\?\) "):
            probe(squeezed, batch, layer="0")
    # Not one logit per sample, nor a row per sample: refused as no classifier's logits.
    for shape in ((6,), (1, 6), (3, 2)):
        with pytest.raises(ValueError, match=rf"^model: returns \({', '.join(map(str, shape))},?\) for an input of "
                                             r"shape \(2, 3, 4, 4\); explainserve serves classifiers returning logits "
                                             r"of shape \(B, num_classes\)$"):
            probe(OddNet(shape), x, layer="conv")
    one_logit = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    for shape in ((2, 1, 1), (1, 2)):
        with pytest.raises(ValueError, match=rf"^model: returns \({', '.join(map(str, shape))}\) for an input of shape"):
            probe(nn.Sequential(one_logit, nn.Flatten(0), nn.Unflatten(0, shape)), x, layer="0.0")
    # Checked before the target-layer rule reads the outputs' graph, too.
    with pytest.raises(ValueError, match=r"^model: returns tuple for an input of shape \(1, 3, 4, 4\); explainserve "
                                         r"serves classifiers returning logits of shape \(B, num_classes\); return the "
                                         r"logits alone \(a forward that returns them, e\.g\. out\[0\] or "
                                         r"out\['logits'\]\)$"):
        probe(LogitsAndInput(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), x)
    model = nn.Sequential(TupleBlock())
    model.forward = lambda inputs: model[0](inputs)[0].mean(dim=(2, 3))
    with pytest.raises(ValueError, match="^layer: '0' returns tuple; a tensor output is required$"):
        probe(model, x, layer="0")


def test_a_forward_pass_failing_at_the_input_size_is_reported_with_the_models_first_line():
    # torch's messages may run over several lines; the report keeps one, whole, and names the setting.
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x150528 and 3072x3)\nException raised from ...")
    report = input_size_failure(error, (1, 3, 224, 224), "--input-size 224 224")
    assert isinstance(report, ValueError)
    assert str(report) == ("--input-size 224 224: the model cannot run on an input of shape (1, 3, 224, 224) "
                           "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x150528 and 3072x3)); "
                           "pass the input size it was trained at")
    assert str(input_size_failure(RuntimeError("  \n"), (1, 1, 4, 4), "input_size=(4, 4)")) == (
        "input_size=(4, 4): the model cannot run on an input of shape (1, 1, 4, 4) (RuntimeError: no message); "
        "pass the input size it was trained at")
