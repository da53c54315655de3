"""timm CNNs, random init (``pretrained=False``), small inputs: the probe is exact.

One small member of each family the README lists for timm, checked like the torchvision zoo
(``support.references.assert_probe_exact``): A and dy/dA against plain autograd, Grad-CAM against
pytorch-grad-cam, the guided input gradient against captum GuidedBackprop.
"""

from __future__ import annotations

import pytest
import torch

from support.references import assert_probe_exact

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow

# family: (timm name, expected target layer, rectifier network)
TIMM_FAMILIES = {
    "ResNet": ("resnet10t", "layer4", True),
    "EfficientNet": ("efficientnet_b0", "bn2", False),
    "ConvNeXt": ("convnext_atto", "norm_pre", False),
    "RegNet": ("regnetx_002", "final_conv", True),
    "MobileNetV3": ("mobilenetv3_small_050", "blocks", False),
    "DenseNet": ("densenet121", "features", True),
    # pre_logits is a 7 x 7 convolution to 4096 filters on one position: a summary, not the map.
    "VGG": ("vgg11", "features.19", True),
}


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_probe_is_exact_on_timm_families(family):
    name, expected_layer, rectifiers = TIMM_FAMILIES[family]
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    assert_probe_exact(model, torch.randn(2, 3, 64, 64), expected_layer, rectifiers=rectifiers)
