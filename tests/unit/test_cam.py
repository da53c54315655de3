import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainserve.cam import (
    class_activation_map,
    grad_cam,
    gradcam_plus_plus_weights,
    gradcam_weights,
    upsample,
    xgradcam_weights,
)
from explainserve.grad_amap import grad_amap
from explainserve.probe import probe


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).min(dim=1).values[:, None, None]
    maps = maps - low
    return maps / (1e-7 + maps.flatten(1).max(dim=1).values[:, None, None])


@pytest.mark.parametrize(
    "ours,theirs", [(gradcam_weights, GradCAM), (gradcam_plus_plus_weights, GradCAMPlusPlus), (xgradcam_weights, XGradCAM)]
)
def test_cams_equal_pytorch_grad_cam_after_the_same_normalisation(ours, theirs):
    model = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    x = torch.randn(2, 3, 96, 96)
    result = probe(model, x, input_gradient=False)
    targets = [ClassifierOutputTarget(int(c)) for c in result.target]
    with theirs(model=model, target_layers=[model.layer4]) as cam:
        expected = cam(input_tensor=x, targets=targets)
    # pytorch-grad-cam min-max normalises at activation resolution, resizes bilinearly, then
    # min-max normalises again.
    cams = class_activation_map(result.activations, result.activation_gradients, ours)
    ours_map = _min_max(upsample(_min_max(cams), (96, 96)))
    assert expected.max() > 0.99
    np.testing.assert_allclose(ours_map.numpy(), expected, atol=2e-4)


def test_grad_cam_is_unnormalised_and_at_input_size():
    model = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    result = probe(model, torch.randn(1, 3, 64, 64), input_gradient=False)
    maps = grad_cam(result.activations, result.activation_gradients, (64, 64))
    assert maps.shape == (1, 64, 64) and maps.dtype == torch.float32
    assert maps.min() >= 0
    weights = result.activation_gradients.mean(dim=(2, 3))
    by_hand = (weights[:, :, None, None] * result.activations).sum(1).clamp(min=0)
    assert torch.allclose(class_activation_map(result.activations, result.activation_gradients), by_hand)


def test_grad_amap_sums_to_the_logit_minus_bias_over_z_for_a_gap_linear_head():
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    result = probe(model, x, input_gradient=False)
    alpha = grad_amap(result.activations, result.activation_gradients)
    z = result.activations.shape[2] * result.activations.shape[3]
    logit = result.logits[torch.arange(3), result.target]
    bias = model.fc.bias[result.target].detach()
    assert alpha.shape == (3, 512)
    assert torch.allclose(alpha.sum(dim=1), (logit - bias) / z, atol=1e-5)
    # Per filter: alpha_k = W_ck * mean(A_k) / Z.
    expected = model.fc.weight[result.target].detach() * result.activations.mean(dim=(2, 3)) / z
    assert torch.allclose(alpha, expected, atol=1e-7)


def test_grad_amap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="gradients"):
        grad_amap(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 3, 3))


def test_channel_weights_by_hand():
    # Channel 0: A = [1, 3], dy/dA = [1, 0.5]; channel 1: A = [1e-7, 0], dy/dA = [1, 0], an
    # activation sum so small that XGrad-CAM's epsilon carries half of its denominator.
    activations = torch.tensor([[[[1.0, 3.0]], [[1e-7, 0.0]]]])
    gradients = torch.tensor([[[[1.0, 0.5]], [[1.0, 0.0]]]])
    torch.testing.assert_close(gradcam_weights(activations, gradients), torch.tensor([[0.75, 0.5]]))
    # Grad-CAM++: alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6) where g != 0, w = sum of alpha * relu(g).
    w0 = 1 / (2 + 4 + 1e-6) * 1.0 + 0.25 / (0.5 + 4 * 0.125 + 1e-6) * 0.5
    w1 = 1 / (2 + 1e-7 + 1e-6) * 1.0
    torch.testing.assert_close(gradcam_plus_plus_weights(activations, gradients), torch.tensor([[w0, w1]]))
    # XGrad-CAM: sum(g * A) / (sum(A) + 1e-7).
    torch.testing.assert_close(xgradcam_weights(activations, gradients), torch.tensor([[2.5 / (4 + 1e-7), 0.5]]))


def _linear_resize(values: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Separable linear resize with half-pixel centres (align_corners=False), one axis at a time."""
    for axis, out in enumerate(size):
        n = values.shape[axis]
        position = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
        values = np.apply_along_axis(lambda line: np.interp(position, np.arange(n), line), axis, values)
    return values


def test_video_grad_cam_is_trilinear_at_clip_size():
    generator = torch.Generator().manual_seed(2)
    activations = torch.rand(2, 3, 2, 3, 2, generator=generator)
    gradients = torch.randn(2, 3, 2, 3, 2, generator=generator)
    maps = grad_cam(activations, gradients, (4, 6, 5))
    assert maps.shape == (2, 4, 6, 5) and maps.dtype == torch.float32
    cams = class_activation_map(activations, gradients).numpy().astype(np.float64)
    assert (cams > 0).any() and (cams == 0).any()  # the ReLU does something
    for b in range(2):
        np.testing.assert_allclose(maps[b].numpy(), _linear_resize(cams[b], (4, 6, 5)), rtol=1e-5, atol=1e-6)
