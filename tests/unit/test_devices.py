"""Device plumbing, on the CPU: the handler runs where TorchServe's context says, the Explainer
moves the model to its device, and a GPU TorchServe assigns without CUDA falls back to the CPU.
(bench/gpu_check.sh runs the same paths on a GPU.)"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn
from ts.context import Context

from explainserve.devices import model_device, serving_device
from explainserve.explainer import Explainer
from explainserve.model_archive import HANDLERS_DIR, METADATA_FILE, WEIGHTS_FILE
from support.serving_harness import explainer_for, random_image, tiny_image_model

sys.path.insert(0, str(HANDLERS_DIR))  # TorchServe puts the archive folder on the path the same way
from image_handler import ImageHandler  # noqa: E402


def test_serving_device_follows_the_gpu_id(monkeypatch):
    assert serving_device(None) == serving_device("") == torch.device("cpu")
    with pytest.raises(ValueError, match="gpu_id"):
        serving_device(-1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule alone, without a GPU
    assert serving_device(1) == serving_device("1") == torch.device("cuda", 1)


def test_an_assigned_gpu_without_cuda_falls_back_to_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="explainserve.devices"):
        assert serving_device(0) == torch.device("cpu")
    assert "assigned GPU 0 but CUDA is not available" in caplog.text


def test_model_device_is_its_parameters_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters at all
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")


@pytest.mark.parametrize("gpu", [None, 0])
def test_the_handler_takes_its_device_from_the_context(tmp_path, monkeypatch, gpu):
    model, metadata = tiny_image_model()
    torch.save(model.state_dict(), tmp_path / WEIGHTS_FILE)
    (tmp_path / METADATA_FILE).write_text(json.dumps(metadata))
    chosen = []
    monkeypatch.setattr("explain_handler.serving_device", lambda gpu_id: chosen.append(gpu_id) or serving_device(None))
    handler = ImageHandler()
    handler.initialize(Context("tiny_image", str(tmp_path), {}, 1, gpu, "0.12.0"))
    assert chosen == [gpu]  # TorchServe's system_properties["gpu_id"], as given
    assert handler.device == handler.explainer.device == model_device(handler.explainer.model) == torch.device("cpu")


def test_an_explicit_device_is_honoured_and_slic_input_stays_on_the_cpu():
    model, metadata = tiny_image_model()
    reference = explainer_for(model, metadata)
    explainer = Explainer(model, kind="image", input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"],
                          device="cpu")
    assert explainer.device == reference.device == model_device(explainer.model) == torch.device("cpu")
    prepared = explainer.prepare([random_image(3)])
    assert prepared.rgb.device.type == "cpu" and prepared.inputs.device == explainer.device
    (served,) = explainer.explain(prepared, ["swag_i_g", "grad_cam", "jitter_cam"])
    (expected,) = reference.explain([random_image(3)], ["swag_i_g", "grad_cam", "jitter_cam"])
    assert np.array_equal(served.alpha, expected.alpha)
    for method in ("swag_i_g", "grad_cam", "jitter_cam"):
        assert np.array_equal(served.maps[method].heatmap, expected.maps[method].heatmap), method
