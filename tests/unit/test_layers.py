"""The target-layer rule on hand-built networks, one clause at a time (explainserve.layers).

Each network is small enough that the right answer is known by reading it; the zoo tests check
the rule on real architectures.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explainserve.layers import default_target_layer, feature_map_layer, resolve_layer


def head(channels: int, classes: int = 3) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]


class Branches(nn.Module):
    """A conv trunk, plus a path from the input's global mean straight to the logits, added
    before or after the trunk's (the graph walk meets the map first, or the bypass)."""

    def __init__(self, shortcut_first: bool = False):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.shortcut = nn.Linear(3, 3)
        self.shortcut_first = shortcut_first

    def forward(self, x):
        pooled, direct = self.fc(self.pool(self.trunk(x)).flatten(1)), self.shortcut(x.mean(dim=(2, 3)))
        return direct + pooled if self.shortcut_first else pooled + direct


class SharedConv(nn.Module):
    """The same conv module called twice: a hook cannot tell its two outputs apart."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(*head(4))

    def forward(self, x):
        return self.head(self.shared(self.shared(self.first(x))))


class SqueezeExcite(nn.Module):
    """A map gated by weights computed from its own global pool: the output is still a map."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(self.pool(x)))


class LogitsAndFeatures(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), *head(4))

    def forward(self, x):
        return super().forward(x), x


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.flatten(2).mean(dim=2, keepdim=True)


class Modulate(nn.Module):
    def forward(self, x, scale):
        return x * scale[:, :, None, None]


class FiLM(nn.Module):
    """A map scaled per channel by a vector a Linear computes from the input's mean colour."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.film = nn.Linear(3, 4)
        self.modulate = Modulate()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.modulate(self.conv(x), self.film(x.mean(dim=(2, 3)))).mean(dim=(2, 3)))


class TokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)).flatten(2).transpose(1, 2)


class TokenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TokenBlock()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.backbone(x).mean(dim=1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return x + self.conv(x)


class ChannelsLast(nn.Module):
    """Its last map is permuted to (B, h, w, C) and the head's Linear reads dimension -1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.last = Permute()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.last(self.conv(x)).mean(dim=(1, 2)))


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class Tokens(nn.Module):
    """A patch embedding read as tokens (B, n, C), as a vision transformer does."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.tokens = nn.Flatten(2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.tokens(self.embed(x)).mean(dim=2))


class TinyViT(nn.Module):
    """A patch embedding read as tokens, then an attention block whose key norm outputs
    (B, heads, tokens, dim), rank 4 like a map, as timm's vision transformers do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.norm(self.embed(x).flatten(2).transpose(1, 2))  # (B, n, 8)
        q, k, v = self.qkv(tokens).reshape(len(x), -1, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each (B, 2 heads, n, 4)
        attended = (q @ self.k_norm(k).transpose(-2, -1)).softmax(-1) @ v
        return self.fc(self.proj(attended.transpose(1, 2).flatten(2)).mean(1))


def test_the_last_map_before_the_pooled_head_skipping_pooling_outputs():
    # VGG's shape: the last max-pool's output is a pooling module's, so the ReLU before it is the target.
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *head(4))
    assert feature_map_layer(vgg_like, torch.randn(2, 3, 8, 8)) == "1"
    # A map computed from a global pool's output is the head, not the trunk.
    pooled_conv_head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Conv2d(4, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5, 3))
    assert feature_map_layer(pooled_conv_head, torch.randn(1, 3, 8, 8)) == "1"
    # ... and so is anything computed from that: a global summary upsampled back to a map, then convolved.
    from_summary = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Upsample(scale_factor=4), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), *head(4))
    assert feature_map_layer(from_summary, torch.randn(1, 3, 8, 8)) == "1"
    # A map of one column still has several positions.
    assert feature_map_layer(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *head(4)),
                             torch.randn(1, 3, 8, 1)) == "1"
    # A pooling module of one's own returning (B, C, 1): a summary, not tokens.
    assert feature_map_layer(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), MeanOverPositions(), nn.Flatten(),
                                           nn.Linear(4, 3)), torch.randn(1, 3, 8, 8)) == "1"
    # SqueezeNet's head has no Linear: a convolution to class maps, pooled.
    squeeze_like = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert feature_map_layer(squeeze_like, torch.randn(1, 3, 8, 8)) == "3"
    # An average pool that leaves several positions is skipped too.
    assert feature_map_layer(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), *head(4)),
                             torch.randn(1, 3, 8, 8)) == "0"


def test_a_squeeze_excitation_block_output_stays_a_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), SqueezeExcite(4), *head(4))
    assert feature_map_layer(model, torch.randn(1, 3, 8, 8)) == "2"
    # FiLM: a module given the map and a per-channel vector (rank 2, not a pool's output) returns a map.
    assert feature_map_layer(FiLM(), torch.randn(1, 3, 8, 8)) == "modulate"


def test_a_block_returning_tokens_of_the_target_map_to_a_mean_and_linear_head_is_accepted():
    # The block's own (B, n, C) output completes after the map inside it; its head is a mean and a
    # Linear, a pooled map in token form, so CAMs of the inner map are exact.
    assert feature_map_layer(TokenBackbone(), torch.randn(1, 3, 8, 8)) == "backbone.relu"


def test_the_graph_walk_visits_each_node_once():
    # 40 residual blocks in the pooled head: 2**40 paths from the logits back to the map, 81 nodes on them.
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), *(Residual() for _ in range(40)),
                          nn.Flatten(), nn.Linear(1, 3))
    assert feature_map_layer(model, torch.randn(1, 3, 4, 4)) == "1"


def test_video_maps_are_rank_five():
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    assert feature_map_layer(model, torch.randn(1, 3, 4, 8, 8)) == "1"
    # A convolution spanning the whole clip gives (B, C, 1, 1, 1), one position: a summary, as in two dimensions.
    spanning = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, (4, 8, 8)), nn.ReLU(),
                             nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))
    assert feature_map_layer(spanning, torch.randn(1, 3, 4, 8, 8)) == "1"


def test_a_module_called_twice_is_never_the_target():
    assert feature_map_layer(SharedConv(), torch.randn(1, 3, 8, 8)) == "first"


def test_refusals_name_the_reason_and_the_candidates():
    with pytest.raises(ValueError, match=r"^layer: the logits depend on the input through a path that bypasses the "
                                         r"last spatial map trunk \(1, 4, 8, 8\), so no single layer can be chosen; "
                                         r"candidates: trunk\.0 \(1, 4, 8, 8\), trunk\.1 \(1, 4, 8, 8\), "
                                         r"trunk \(1, 4, 8, 8\), pool \(1, 4, 1, 1\); pass layer=<dotted module name>$"):
        feature_map_layer(Branches(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"bypasses the last spatial map trunk"):
        feature_map_layer(Branches(shortcut_first=True), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^layer: the last spatial map last \(1, 8, 8, 6\) is channels-last \(fc takes "
                                         r"its last dimension\); the maps need \(B, C, \.\.\.\) activations; "
                                         r"candidates: conv \(1, 6, 8, 8\), last \(1, 8, 8, 6\)"):
        feature_map_layer(ChannelsLast(), torch.randn(1, 3, 8, 8))
    # The width equal to the channels: (B, h, w, C) = (1, 8, 6, 6) is still read as channels-last ...
    with pytest.raises(ValueError, match=r"last \(1, 8, 6, 6\) is channels-last"):
        feature_map_layer(ChannelsLast(), torch.randn(1, 3, 8, 6))
    # ... and a channels-first (1, 6, 8, 6) map whose width equals its channels is not.
    assert feature_map_layer(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), *head(6)),
                             torch.randn(1, 3, 8, 6)) == "1"
    with pytest.raises(ValueError, match=r"^model: returns tuple for an input of shape \(1, 3, 8, 8\); "):
        feature_map_layer(LogitsAndFeatures(), torch.randn(2, 3, 8, 8))
    # Only the last eight maps are listed; "none" when there is none.
    deep = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), *(nn.Conv2d(1, 1, 1) for _ in range(9)), nn.Flatten(2),
                         nn.Linear(64, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"candidates: 2 \(1, 1, 8, 8\), 3 \(1, 1, 8, 8\), .*, 9 \(1, 1, 8, 8\); pass"):
        feature_map_layer(deep, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(layers with rank-4 outputs: none\); pass layer="):
        feature_map_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^layer: the head does not pool the last spatial map embed \(1, 6, 2, 2\): "
                                         r"tokens \(1, 6, 4\) follows it \(a transformer is not a CNN\)"):
        feature_map_layer(Tokens(), torch.randn(1, 3, 8, 8))
    # A rank-4 attention internal after the tokens is not named as the map; the patch embedding is.
    with pytest.raises(ValueError, match=r"^layer: the head does not pool a spatial map: the first tokens, norm "
                                         r"\(1, 4, 8\), follow embed \(1, 8, 2, 2\), and tokens follow every later "
                                         r"output of rank 4 \(the last: k_norm \(1, 2, 4, 4\)\) \(a transformer is not "
                                         r"a CNN\); candidates: embed \(1, 8, 2, 2\); pass layer=<dotted module name>$"):
        feature_map_layer(TinyViT(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^layer: no module outputs a spatial feature map of rank 4 with more than "
                                         r"one position before the head pools \(layers with rank-4 outputs: 0 \(1, 4, 1, 1\), "
                                         r"1 \(1, 4, 1, 1\)\); pass layer=<dotted module name>$"):
        feature_map_layer(nn.Sequential(nn.Conv2d(3, 4, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
                          torch.randn(1, 3, 8, 8))


def test_a_named_target_overrides_the_rule_and_layer_overrides_both():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), *head(4))
    inputs = torch.randn(1, 3, 8, 8)
    assert default_target_layer(model, inputs) == "3"
    model.target_layer = "1"
    assert default_target_layer(model) == "1"  # no input needed
    assert resolve_layer(model, None, inputs) == ("1", model[1])
    assert resolve_layer(model, "2", inputs) == ("2", model[2])
    del model.target_layer
    assert resolve_layer(model, None, inputs) == ("3", model[3])
    with pytest.raises(ValueError, match=r"^layer: the target-layer rule needs an input batch"):
        default_target_layer(model)
    with pytest.raises(ValueError, match=r"^layer: unknown layer name 'nine'; accepted: a dotted module name of the "
                                         r"model, e\.g\. 0, 1, 2, 3, 4, 5, 6$"):
        resolve_layer(model, "nine", inputs)
    # Containers are not offered, and at most the last twelve names are.
    nested = nn.Sequential(nn.Sequential(*(nn.ReLU() for _ in range(13))), nn.ModuleList([nn.ReLU()]))
    with pytest.raises(ValueError, match=r"e\.g\. 0\.2, 0\.3, 0\.4, 0\.5, 0\.6, 0\.7, 0\.8, 0\.9, 0\.10, 0\.11, 0\.12, 1\.0$"):
        resolve_layer(nested, "nine", inputs)
    with pytest.raises(ValueError, match=r"unknown layer name ''"):
        resolve_layer(model, "", inputs)


def test_the_choice_is_kept_per_model_and_input_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), *head(4))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert feature_map_layer(model, torch.randn(1, 3, 8, 8)) == "3"
    assert feature_map_layer(model, torch.randn(5, 3, 8, 8)) == "3"  # batch size is not part of the key
    assert len(calls) == 1
    # At 2 x 2 the strided conv's map is 1 x 1, one position: the first ReLU's 2 x 2 map is the target.
    assert feature_map_layer(model, torch.randn(1, 3, 2, 2)) == "1"
    assert len(calls) == 2
