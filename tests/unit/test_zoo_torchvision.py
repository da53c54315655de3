"""Every torchvision classification family, random init, small inputs: the probe is exact.

One member per family (the smallest that runs on a small input; the README's table names
them). For each, on a batch of 2:

* the target-layer rule picks the family's last spatial feature map;
* the probe's A and dy/dA equal a plain autograd reference taken on a detached clone of the
  layer's output;
* the Grad-CAM map equals pytorch-grad-cam's at the same layer, from its own hooks;
* the guided input gradient equals captum GuidedBackprop (ReLU and ReLU6 guided, those after the
  target layer included; SiLU, GELU, Hardswish backpropagated as they are), and for rectifier
  networks it differs from the vanilla gradient, so the comparison can fail;
* for SiLU / GELU / Hardswish networks the maps are finite and not constant.

Transformers without a pooled spatial map (ViT, MViT) or with a channels-last one (Video Swin)
are refused with a clear error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from explainserve.probe import probe
from support.references import assert_probe_exact

pytestmark = pytest.mark.slow

# family: (member tested, input shape (C, H, W) or (C, T, H, W), expected target layer, activations)
IMAGE_FAMILIES = {
    "AlexNet": ("alexnet", (3, 64, 64), "features.11", "relu"),
    "ConvNeXt": ("convnext_tiny", (3, 64, 64), "features", "gelu"),
    "DenseNet": ("densenet121", (3, 64, 64), "features", "relu"),
    "EfficientNet": ("efficientnet_b0", (3, 64, 64), "features", "silu"),
    "EfficientNetV2": ("efficientnet_v2_s", (3, 64, 64), "features", "silu"),
    "GoogLeNet": ("googlenet", (3, 64, 64), "inception5b", "relu"),
    "Inception v3": ("inception_v3", (3, 139, 139), "Mixed_7c", "relu"),
    "MaxViT": ("maxvit_t", (3, 32, 32), "blocks.1", "gelu"),
    "MNASNet": ("mnasnet0_5", (3, 64, 64), "layers", "relu"),
    "MobileNetV2": ("mobilenet_v2", (3, 64, 64), "features", "relu6"),
    "MobileNetV3": ("mobilenet_v3_small", (3, 64, 64), "features", "hardswish"),
    "RegNet": ("regnet_y_400mf", (3, 64, 64), "trunk_output", "relu"),
    "ResNet, ResNeXt, Wide ResNet": ("resnet18", (3, 64, 64), "layer4", "relu"),
    "ShuffleNetV2": ("shufflenet_v2_x0_5", (3, 64, 64), "conv5", "relu"),
    "SqueezeNet": ("squeezenet1_1", (3, 64, 64), "classifier.2", "relu"),
    "Swin, Swin V2": ("swin_t", (3, 64, 64), "permute", "gelu"),
    "VGG": ("vgg11_bn", (3, 64, 64), "features.27", "relu"),
}
VIDEO_FAMILIES = {
    "Video ResNet (R3D, MC3, R(2+1)D)": ("r2plus1d_18", (3, 4, 32, 32), "layer4", "relu"),
    "S3D": ("s3d", (3, 8, 64, 64), "features", "relu"),
}
# Refused by the rule: (builder, input shape, why). ViT and MViT heads read tokens; Video Swin's
# last map is channels-last (B, t, h, w, C), which no layer of it turns channels-first.
REFUSED = {
    "ViT": (lambda: build("vit_b_16", image_size=32), (3, 32, 32), "the head does not pool .* is not a CNN"),
    "MViT": (lambda: _tiny_mvit(), (3, 4, 32, 32), "the head does not pool .* is not a CNN"),
    "Video Swin": (lambda: build("swin3d_t"), (3, 4, 64, 64), r"norm \(1, 2, 2, 2, 768\) is channels-last"),
}
# Which family each torchvision name belongs to, by name prefix.
PREFIXES = {
    "alexnet": "AlexNet", "convnext": "ConvNeXt", "densenet": "DenseNet", "efficientnet_b": "EfficientNet",
    "efficientnet_v2": "EfficientNetV2", "googlenet": "GoogLeNet", "inception": "Inception v3", "maxvit": "MaxViT",
    "mnasnet": "MNASNet", "mobilenet_v2": "MobileNetV2", "mobilenet_v3": "MobileNetV3", "regnet": "RegNet",
    "resne": "ResNet, ResNeXt, Wide ResNet", "wide_resnet": "ResNet, ResNeXt, Wide ResNet",
    "shufflenet": "ShuffleNetV2", "squeezenet": "SqueezeNet", "swin3d": "Video Swin", "swin": "Swin, Swin V2",
    "vgg": "VGG", "vit": "ViT", "r3d": "Video ResNet (R3D, MC3, R(2+1)D)", "mc3": "Video ResNet (R3D, MC3, R(2+1)D)",
    "r2plus1d": "Video ResNet (R3D, MC3, R(2+1)D)", "s3d": "S3D", "mvit": "MViT",
}
FAMILIES = {**IMAGE_FAMILIES, **VIDEO_FAMILIES}
# Members whose smallest torchvision configuration needs 224 px (16 frames for S3D), shrunk to
# the small inputs above: MaxViT's own class with two narrow stages, S3D with its 2x7x7 head
# pool sized for 64 px and 8 frames. The trunks' layer types are the family's own.
SHRUNK = {
    "maxvit_t": lambda: torchvision.models.maxvit.MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=5),
    "s3d": lambda: _with_head_pool(torchvision.models.video.s3d(num_classes=5), nn.AvgPool3d((1, 2, 2), stride=1)),
}


def _tiny_mvit() -> nn.Module:
    """MViT v2 (its own builder and block type), two one-head blocks at 4 x 32 x 32."""
    from torchvision.models.video.mvit import MSBlockConfig, _mvit

    block = MSBlockConfig(num_heads=1, input_channels=96, output_channels=96, kernel_q=[3, 3, 3],
                          kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 2, 2])
    return _mvit(block_setting=[block, block], stochastic_depth_prob=0.0, weights=None, progress=False,
                 spatial_size=(32, 32), temporal_size=4, residual_pool=True, residual_with_cls_embed=False,
                 rel_pos_embed=True, proj_after_attn=True, num_classes=5).eval()


def _with_head_pool(model: nn.Module, pool: nn.Module) -> nn.Module:
    model.avgpool = pool
    return model


def family_of(name: str) -> str:
    prefix = max((p for p in PREFIXES if name.startswith(p)), key=len)
    return PREFIXES[prefix]


def test_every_torchvision_classifier_belongs_to_a_tested_family():
    names = torchvision.models.list_models(module=torchvision.models) + \
        torchvision.models.list_models(module=torchvision.models.video)
    assert len(names) > 80
    for name in names:
        assert family_of(name) in {**FAMILIES, **REFUSED}, name


def build(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in SHRUNK:
            return SHRUNK[name]().eval()
        return torchvision.models.get_model(name, weights=None, num_classes=5, **kwargs).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_is_exact_on_every_family(family):
    name, shape, expected_layer, activation = FAMILIES[family]
    model = build(name)
    assert_probe_exact(model, torch.randn(2, *shape), expected_layer, rectifiers=activation in ("relu", "relu6"))


@pytest.mark.parametrize("family", REFUSED)
def test_transformers_without_a_channels_first_pooled_map_are_refused(family):
    builder, shape, why = REFUSED[family]
    with pytest.raises(ValueError, match=f"layer: .*{why}.*candidates: .* pass layer="):
        probe(builder(), torch.randn(1, *shape))
