"""A one-logit (sigmoid) classifier served as two classes with logits (-z / 2, z / 2).

The reference is independent of the adapter: the same network with a two-row head (-w / 2, w / 2)
and biases (-b / 2, b / 2), an ordinary two-class classifier that computes the same logits. Every
map, alpha and verdict input of the adapted model must equal that network's, on two architectures.
"""

from __future__ import annotations

import copy
import inspect
import io

import numpy as np
import pytest
import torch
import torchvision
from skimage import data
from torch import nn

from explainserve.cli import build_parser
from explainserve.commands.archive import user_model
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.models import served_as_two_classes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def one_logit_and_two_row_twin(name: str) -> tuple[nn.Module, nn.Module]:
    """A random-init torchvision ``name`` with one logit, and the same network with the two-row head."""
    torch.manual_seed(0)
    one = getattr(torchvision.models, name)(weights=None, num_classes=1).eval()
    twin = getattr(torchvision.models, name)(weights=None, num_classes=2).eval()
    state = one.state_dict()
    head = [key for key, tensor in state.items() if tensor.shape != twin.state_dict()[key].shape]
    for key in head:  # the head's weight and bias rows: (-x / 2, x / 2)
        state[key] = torch.cat([-state[key] / 2, state[key] / 2])
    twin.load_state_dict(state)
    return one, twin


def test_the_two_logits_give_the_sigmoids_probabilities_and_keep_names_and_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    x = torch.randn(5, 3, 8, 8)
    z = model(x)
    names, keys = [name for name, _ in model.named_modules()], list(model.state_dict())
    assert served_as_two_classes(served_as_two_classes(model)) is model  # twice is once
    logits = model(x)
    assert logits.shape == (5, 2)
    torch.testing.assert_close(logits, torch.cat([-z / 2, z / 2], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
    assert (logits.argmax(1) == (z[:, 0] > 0).long()).all()
    assert [name for name, _ in model.named_modules()] == names and list(model.state_dict()) == keys
    # A copy and a pickled model keep the adaptation (the hook is a module-level function).
    torch.testing.assert_close(copy.deepcopy(model)(x), logits)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), logits)


class Squeezed(nn.Module):
    """A binary classifier whose forward ends in ``squeeze()``: (B,) logits, () for one sample."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3))).squeeze()


def test_squeezed_logits_are_served_as_two_classes_too(tmp_path):
    torch.manual_seed(0)
    model, x = Squeezed().eval(), torch.randn(3, 3, 8, 8)
    z = model(x)
    assert z.shape == (3,) and model(x[:1]).shape == ()
    served_as_two_classes(model)
    torch.testing.assert_close(model(x), torch.stack([-z / 2, z / 2], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(model(x[:1]), model(x)[:1])
    # archive reads the one logit from the model's output, whatever its shape.
    (tmp_path / "net.py").write_text(inspect.getsource(Squeezed).join(["import torch\nfrom torch import nn\n\n\n", ""]))
    torch.save(Squeezed().state_dict(), tmp_path / "net.pt")
    args = build_parser(("explainserve.commands.archive",)).parse_args(
        ["archive", "--model-file", str(tmp_path / "net.py"), "--model-class", "Squeezed", "--weights",
         str(tmp_path / "net.pt"), "--input-size", "8", "8", "--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"])
    archived, metadata = user_model(args)
    assert metadata["architecture"]["one_logit"] is True and metadata["class_names"] == ["class_0", "class_1"]
    assert archived(x).shape == (3, 2)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_maps_and_alpha_equal_those_of_the_same_network_with_a_two_row_head(name):
    one, twin = one_logit_and_two_row_twin(name)
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    explainers = [Explainer(model, kind="image", input_size=(64, 64), mean=MEAN, std=STD, class_names=["no", "yes"])
                  for model in (served_as_two_classes(one), twin)]
    methods = ["swag_i_g", "grad_cam", "jitter_cam"]
    options = ExplainOptions(n_segments=50, top_k=2)
    # Both classes of each photo: the predicted one and the other (class 0 follows -dz/dA).
    adapted, reference = ([explainer.explain(photos, methods, options, targets=targets)
                           for targets in ([None] * 3, [0, 1, 0])] for explainer in explainers)
    for adapted_results, reference_results in zip(adapted, reference):
        for got, expected in zip(adapted_results, reference_results):
            assert (got.predicted, got.target, list(got.classes)) == (expected.predicted, expected.target,
                                                                       list(expected.classes))
            np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5)
            np.testing.assert_allclose(got.alpha, expected.alpha, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(got.features, expected.features, rtol=1e-5, atol=1e-7)
            for method in methods:
                np.testing.assert_allclose(got.maps[method].heatmap, expected.maps[method].heatmap,
                                           rtol=1e-4, atol=1e-6, err_msg=method)
    # Explaining class 0 is explaining -z: its alpha is class 1's negated.
    chosen = [explainers[0].explain(photos, [], options, targets=[c] * 3) for c in (0, 1)]
    for zero, one_ in zip(*chosen):
        np.testing.assert_allclose(zero.alpha, -one_.alpha, rtol=1e-5, atol=1e-8)
