"""The checkpoint forms ``--weights`` takes: a plain state-dict, a training checkpoint holding it,
and the key prefixes of the wrappers a model is trained in (DataParallel, torch.compile, a
Lightning module). Each is loaded into a fresh model and compared tensor for tensor."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from explainserve.models import load_torchvision_weights
from explainserve.models.state_dicts import load_checked, read_state_dict


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


def assert_same_weights(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


class Lightning(nn.Module):
    """What a LightningModule saves: its network under the attribute name, a loss's buffer beside it."""

    def __init__(self):
        super().__init__()
        self.model = tiny_net()
        self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))


TRAINED = tiny_net().state_dict()
for tensor in TRAINED.values():  # weights no fresh model has
    tensor.add_(3)  # num_batches_tracked is an integer

FORMS = {
    "plain": TRAINED,
    "checkpoint state_dict": {"state_dict": TRAINED, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}},
    "checkpoint model": {"model": TRAINED, "epoch": 7},
    "DataParallel": prefixed(TRAINED, "module."),
    "torch.compile": prefixed(TRAINED, "_orig_mod."),
    "DataParallel of torch.compile": prefixed(TRAINED, "module._orig_mod."),
    "Lightning": {"state_dict": {**prefixed(TRAINED, "model."), "criterion.weight": torch.tensor([1.0, 3.0])}},
}


@pytest.mark.parametrize("form", FORMS)
def test_every_checkpoint_form_loads_the_trained_weights(tmp_path, form):
    path = tmp_path / "weights.pt"
    torch.save(FORMS[form], path)
    model = load_checked(tiny_net(), read_state_dict(path), path, "tiny net")
    assert_same_weights(model, TRAINED)


def test_the_lightning_form_matches_a_real_module_state_dict(tmp_path):
    module = Lightning()
    module.model.load_state_dict(TRAINED)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    assert_same_weights(load_checked(tiny_net(), read_state_dict(path), path, "tiny net"), TRAINED)


def test_two_copies_of_the_weights_are_refused_naming_both_prefixes(tmp_path):
    path = tmp_path / "ema.pt"
    torch.save({**prefixed(TRAINED, "model."), **prefixed(TRAINED, "model_ema.")}, path)
    with pytest.raises(ValueError, match=r"ema\.pt: holds the model's weights 2 times, under the key prefixes "
                                         r"\['model\.', 'model_ema\.'\]; save the copy to serve alone"):
        load_checked(tiny_net(), read_state_dict(path), path, "tiny net")


def test_a_prefix_that_does_not_give_the_model_is_named_as_a_mismatch(tmp_path):
    # One tensor short under the prefix: nothing is guessed, the missing key is named.
    path = tmp_path / "short.pt"
    torch.save({key: value for key, value in prefixed(TRAINED, "model.").items() if key != "model.5.bias"}, path)
    with pytest.raises(ValueError, match=r"short\.pt: does not hold weights of tiny net: "
                                         r"1 missing keys \['5\.bias'\], 0 unexpected"):
        load_checked(tiny_net(), read_state_dict(path), path, "tiny net")


def test_torchvision_weights_from_a_compiled_model_keep_their_class_count(tmp_path):
    trained = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(torch.compile(trained).state_dict(), path)  # keys under _orig_mod.; compiling runs nothing
    loaded = load_torchvision_weights("resnet18", path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
