"""The demo architectures: two VGG-style 2-D CNNs for FashionScenes (64 px / 128 filters and
112 px / 512 filters at the target layer) and a C3D-style 3-D CNN for MovingFashion.

Both are plain stacks of conv–BatchNorm–ReLU blocks followed by global average pooling and a
linear head, so CAM methods apply directly. The ``target_layer`` attribute names the last conv
block (what :func:`explainserve.layers.default_target_layer` picks up).
"""

from __future__ import annotations

from torch import nn

IMAGE_ARCHITECTURE = "fashion_vgg"
LARGE_IMAGE_ARCHITECTURE = "fashion_vgg512"
VIDEO_ARCHITECTURE = "motion_c3d"


def _block(conv: type, channels_in: int, channels_out: int, stride, kernel_size: int = 3) -> nn.Sequential:
    norm = nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm3d
    return nn.Sequential(
        conv(channels_in, channels_out, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        norm(channels_out),
        nn.ReLU(inplace=True),
    )


class _ConvClassifier(nn.Module):
    """Conv blocks -> global average pool -> linear. ``features`` is an ``nn.Sequential``."""

    target_layer: str

    def __init__(self, features: nn.Sequential, channels: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1) if isinstance(features[0][0], nn.Conv2d) else nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.target_layer = f"features.{len(features) - 1}"

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class FashionVGG(_ConvClassifier):
    """VGG-style CNN for 64x64 RGB scenes: 7 conv blocks, widths 24-32-32-64-64-128-128.

    Three stride-2 convolutions take 64 px to an 8x8 map at the target layer
    (``features.6``), leaving room for CAMs and Jitter-CAM (the map must be at least 7x7).

    Input (B, 3, H, W) normalised RGB; output (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 8):
        plan = ((3, 24, 1), (24, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1))
        super().__init__(nn.Sequential(*(_block(nn.Conv2d, i, o, s) for i, o, s in plan)), 128, num_classes)


class FashionVGG512(_ConvClassifier):
    """VGG-style CNN for 112x112 RGB scenes with 512 filters at its target layer.

    Four stride-2 convolutions take 112 px to a 7x7 map, the thesis's VGG16 / ResNet-50 map
    size at 224 px. The last block is a 1x1 expansion from 256 to 512 channels (as ResNet-50's
    bottlenecks end in a 1x1 expansion to 2048): the filter count the anomaly statistics need,
    at about 110 M multiply-adds and 0.7 M weights, so it trains on a 2-core CPU within an hour.

    Input (B, 3, 112, 112) normalised RGB; output (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 8):
        plan = ((3, 32, 2, 3), (32, 64, 2, 3), (64, 64, 1, 3), (64, 128, 2, 3), (128, 128, 1, 3),
                (128, 256, 2, 3), (256, 512, 1, 1))
        super().__init__(nn.Sequential(*(_block(nn.Conv2d, i, o, s, k) for i, o, s, k in plan)), 512, num_classes)


class MotionC3D(_ConvClassifier):
    """C3D-style 3-D CNN for 16x64x64 clips: 4 conv blocks, widths 16-32-64-64.

    The stem halves time and space (its 3-frame kernel still sees every frame pair), the next
    block halves space, the third halves both, giving a 4x8x8 map at the target layer
    (``features.3``). Lean on purpose: it trains on a 2-core CPU in under 30 minutes.

    Input (B, 3, T, H, W) normalised RGB; output (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 8):
        plan = ((3, 16, 2), (16, 32, (1, 2, 2)), (32, 64, 2), (64, 64, 1))
        super().__init__(nn.Sequential(*(_block(nn.Conv3d, i, o, s) for i, o, s in plan)), 64, num_classes)


DEMO_ARCHITECTURES = {IMAGE_ARCHITECTURE: FashionVGG, LARGE_IMAGE_ARCHITECTURE: FashionVGG512,
                      VIDEO_ARCHITECTURE: MotionC3D}
