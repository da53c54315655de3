import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from explainserve.cam import grad_cam
from explainserve.jitter_cam import jitter_cam, patch_offsets
from explainserve.probe import probe


class PooledChannelNet(nn.Module):
    """A model with a hand-computable CAM.

    A = cell means (cells of ``cell`` pixels) of input channel 0; logit 0 = mean(A), logit 1 = -mean(A).
    For class 0, dy/dA = 1/Z everywhere, so the Grad-CAM weight is 1/Z and CAM = relu(A)/Z.
    """

    def __init__(self, cell: int):
        super().__init__()
        self.select = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.select.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1))
        self.pool = nn.AvgPool2d(cell)

    def forward(self, x):
        a = self.pool(self.select(x)).mean(dim=(1, 2, 3))
        return torch.stack([a, -a], dim=1)


@pytest.mark.parametrize("size,d,stride", [((32, 32), 4, 1), ((32, 48), (2, 3), 1), ((32, 32), 3, 2)])
def test_jitter_cam_equals_the_hand_computed_average_over_patches(size, d, stride):
    cell = 8
    model = PooledChannelNet(cell).eval()
    x = torch.rand(2, 3, *size) + 0.1  # positive, so relu(A) = A
    m = (size[0] // cell, size[1] // cell)
    result = jitter_cam(model, x, torch.tensor([0, 0]), cam_size=m, layer="pool", d=d, stride=stride)

    d_h, d_w = (d, d) if isinstance(d, int) else d
    upscaled = F.interpolate(x, size=(size[0] + d_h * cell, size[1] + d_w * cell), mode="bilinear", align_corners=False)
    # Patch (i, j) sees upscaled cell (u, v) at its own cell (u - i, v - j): every patch covering
    # a cell gives it the same value, so J / C is the cell mean of the upscaled channel 0 over Z.
    z = m[0] * m[1]
    expected_cells = F.avg_pool2d(upscaled[:, :1], cell)[:, 0] / z
    expected = F.interpolate(expected_cells[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(result, expected, atol=1e-6)


class AdaptiveChannelNet(PooledChannelNet):
    """PooledChannelNet whose cells are an adaptive pooling to ``cells``: any input size works."""

    def __init__(self, cells: tuple[int, int]):
        super().__init__(1)
        self.pool = nn.AdaptiveAvgPool2d(cells)


# 28 x 40 pixels over a 3 x 3 map: cells of 9.33 x 13.33 pixels, offsets 9.33, 18.67 and 13.33,
# 26.67 round to 9, 19 and 13, 27 (truncation would give 18 and 26). 21 x 21 over 2 x 2 with
# d = 3: the last offset, 31.5, rounds (to even) to 32, past the 52 - 21 = 31 the upscaled
# image allows, and is clamped to 31.
@pytest.mark.parametrize("height,width,m,d,rows,columns", [
    (28, 40, (3, 3), (2, 3), [0, 9, 19], [0, 13, 27, 40]),
    (21, 21, (2, 2), (3, 3), [0, 10, 21, 31], [0, 10, 21, 31]),
])
def test_cell_sizes_that_do_not_divide_the_input_round_each_patch_to_the_nearest_pixel(height, width, m, d, rows,
                                                                                       columns):
    # Each patch starts at the pixel nearest to its cell offset times the cell size (Python's
    # rounding), within the upscaled image; its CAM is relu(A) / Z with A the adaptive cell
    # means of channel 0; J / C averages the patches that cover each cell.
    model = AdaptiveChannelNet(m).eval()
    x = torch.rand(2, 3, height, width) + 0.1
    result = jitter_cam(model, x, torch.tensor([0, 0]), cam_size=m, layer="pool", d=d)

    cell_h, cell_w = height / m[0], width / m[1]
    big = (round(height + d[0] * cell_h), round(width + d[1] * cell_w))
    upscaled = F.interpolate(x, size=big, mode="bilinear", align_corners=False)
    total, count = torch.zeros(2, m[0] + d[0], m[1] + d[1]), torch.zeros(m[0] + d[0], m[1] + d[1])
    starts = []
    for i in range(d[0] + 1):
        for j in range(d[1] + 1):
            y, x0 = min(round(i * cell_h), big[0] - height), min(round(j * cell_w), big[1] - width)
            starts.append((y, x0))
            patch = upscaled[:, :1, y : y + height, x0 : x0 + width]
            total[:, i : i + m[0], j : j + m[1]] += F.adaptive_avg_pool2d(patch, m)[:, 0] / (m[0] * m[1])
            count[i : i + m[0], j : j + m[1]] += 1
    assert sorted({y for y, _ in starts}) == rows and sorted({x for _, x in starts}) == columns
    expected = F.interpolate((total / count)[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(result, expected, atol=1e-6)


def test_count_map_covers_every_cell_with_any_stride():
    assert patch_offsets(4, 1) == [0, 1, 2, 3, 4]
    assert patch_offsets(5, 2) == [0, 2, 4, 5]
    assert patch_offsets(0, 3) == [0]


def test_d_zero_is_grad_cam():
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    result = probe(model, x, input_gradient=False)
    expected = grad_cam(result.activations, result.activation_gradients, (64, 64))
    cams = jitter_cam(model, x, result.target, cam_size=result.activations.shape[-2:], d=0)
    assert torch.allclose(cams, expected, rtol=1e-4, atol=1e-6)


def test_default_d_doubles_the_resolution_and_batches_patches():
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        cams = jitter_cam(model, x, torch.tensor([1]), cam_size=(2, 2), batch_size=16)
    finally:
        handle.remove()
    assert cams.shape == (1, 64, 64)
    # the target-layer rule's one dry pass on one sample, then (d + 1)^2 = 9 patches for a 2x2 CAM in one pass
    assert calls == [1, 9]
    calls.clear()
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        jitter_cam(model, x, torch.tensor([1]), cam_size=(2, 2), batch_size=4, layer="layer4")
    finally:
        handle.remove()
    assert calls == [4, 4, 1]  # a named layer needs no dry pass; 9 patches in chunks of 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"d": -1}, "d: must be >= 0"),
        ({"stride": 0}, "stride: must be an int >= 1"),
        ({"d": 100}, "d: at most"),
        ({"d": (1, 2, 3)}, r"d: expected an int or a pair of ints, got \(1, 2, 3\)"),
        ({"d": (True, 1)}, "d: expected an int or a pair of ints"),
        ({"d": 1.5}, "d: expected an int or a pair of ints, got 1.5"),
        ({"cam_size": (2, 2, 2)}, "cam_size: expected an int or a pair of ints"),
        ({"cam_size": (3, 3)}, r"cam_size: the layer's map is \(2, 2\), not \(3, 3\)"),
        ({"batch_size": 0}, "batch_size: must be an int >= 1"),
        ({"inputs": torch.randn(1, 3, 2, 64, 64)}, r"inputs: Jitter-CAM takes images \(B, C, H, W\), got rank 5"),
    ],
)
def test_bad_parameters_raise(kwargs, message):
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    arguments = {"inputs": torch.randn(1, 3, 64, 64), "cam_size": (2, 2)} | kwargs
    inputs = arguments.pop("inputs")
    with pytest.raises(ValueError, match=message):
        jitter_cam(model, inputs, torch.tensor([0]), **arguments)


def test_each_axis_takes_d_from_zero_to_four_times_its_cam_size():
    model = PooledChannelNet(8).eval()
    x = torch.rand(1, 3, 32, 32)
    for d in ((16, 0), (0, 16)):
        assert jitter_cam(model, x, torch.tensor([0]), cam_size=(4, 4), layer="pool", d=d).shape == (1, 32, 32)
    for d, message in (((17, 0), "d: at most"), ((0, 17), "d: at most"), ((-1, 0), "d: must be >= 0"),
                       ((0, -1), "d: must be >= 0")):
        with pytest.raises(ValueError, match=message):
            jitter_cam(model, x, torch.tensor([0]), cam_size=(4, 4), layer="pool", d=d)


def test_one_patch_per_pass_gives_the_same_map():
    model = PooledChannelNet(8).eval()
    x = torch.rand(2, 3, 32, 32)
    together = jitter_cam(model, x, torch.tensor([0, 1]), cam_size=(4, 4), layer="pool", d=2)
    alone = jitter_cam(model, x, torch.tensor([0, 1]), cam_size=(4, 4), layer="pool", d=2, batch_size=1)
    assert torch.allclose(together, alone, atol=1e-7)


def test_the_requested_class_is_explained_not_the_predicted_one():
    # PooledChannelNet: class 1's logit is -mean(A), so its CAM is relu(-A) / Z, zero where A > 0,
    # and class 0's is relu(A) / Z. Sample 0 is positive (predicted 0), sample 1 negative (predicted 1).
    model = PooledChannelNet(8).eval()
    positive = torch.rand(1, 3, 32, 32) + 0.1
    x = torch.cat([positive, -positive])
    assert probe(model, x, input_gradient=False).predicted.tolist() == [0, 1]
    other = jitter_cam(model, x, torch.tensor([1, 0]), cam_size=(4, 4), layer="pool", d=2)
    assert torch.equal(other, torch.zeros_like(other))
    own = jitter_cam(model, x, torch.tensor([0, 1]), cam_size=(4, 4), layer="pool", d=2)
    assert (own > 0).all()
