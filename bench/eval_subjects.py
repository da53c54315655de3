"""What the evaluation runs on: a model, its Explainer and a fixed, seeded test subset.

``--random-init`` swaps the trained weights for a random initialisation of the same demo
architectures, to exercise the harness without them; its numbers say nothing about the methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explainserve.explainer import Explainer
from explainserve.models.architectures import DEMO_ARCHITECTURES, IMAGE_ARCHITECTURE, VIDEO_ARCHITECTURE

RANDOM_INIT_INPUT = {"image": (64, 64), "video": (16, 64, 64)}


@dataclass
class Subject:
    """A model under evaluation and the samples it is evaluated on.

    Attributes
    ----------
    name : model description for the report.
    model : classifier in eval mode.
    explainer : Explainer of ``model``.
    samples : uint8 images (N, H, W, 3) or clips (N, T, H, W, 3).
    labels : (N,) int64 ground-truth classes.
    masks : (N, H, W) or (N, T, H, W) bool object masks.
    boxes : (N, 4) or (N, T, 4) half-open (y0, x0, y1, x1) boxes.
    """

    name: str
    model: torch.nn.Module
    explainer: Explainer
    samples: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray

    def inputs(self, indices=slice(None)) -> torch.Tensor:
        """Normalised model inputs of samples ``indices``, exactly as the Explainer builds them."""
        return self.explainer.prepare(list(self.samples[indices])).inputs

    @property
    def layer(self) -> torch.nn.Module:
        return self.model.get_submodule(self.explainer.layer)

    @property
    def scoring_model(self) -> torch.nn.Module:
        """``model`` for forward passes without gradients (the perturbation metrics, LIME)."""
        return ChannelsLast(self.model)


class ChannelsLast(torch.nn.Module):
    """``model`` run on channels-last images: the same function, with oneDNN's faster
    convolutions on this CPU (1.5x the images/s of the 64 px model at batch 256, measured at load
    average 15). Probabilities differ from the contiguous layout's by about 4e-7, as batch 1 and
    batch 64 already differ; clips (rank 5) pass unchanged.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs)


def _dataset(kind: str, split: str, size: int, image_size: int):
    from explainserve import data

    if kind == "image":
        return data.FashionScenes(split, seed=0, size=size, image_size=image_size)
    return data.MovingFashion(split, seed=0, size=size, image_size=image_size)


def _random_init_model(kind: str, num_classes: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    architecture = IMAGE_ARCHITECTURE if kind == "image" else VIDEO_ARCHITECTURE
    model = DEMO_ARCHITECTURES[architecture](num_classes=num_classes)
    return model, {"architecture": f"{architecture} (random init)", "input_size": RANDOM_INIT_INPUT[kind],
                   "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "target_layer": model.target_layer}


def load_subject(demo: str, split: str, size: int, *, random_init: bool = False) -> Subject:
    """The demo model ``demo`` ("image", "image_large" or "video") and the first ``size``
    samples of ``split``, composed at the model's input size."""
    from explainserve.models.training import check_kind

    kind = check_kind(demo).kind
    if random_init:
        dataset = _dataset(kind, split, size, RANDOM_INIT_INPUT[kind][-1])
        model, metadata = _random_init_model(kind, len(dataset.class_names))
    else:
        from explainserve.models import load_demo_model

        model, metadata = load_demo_model(demo)
        dataset = _dataset(kind, split, size, int(metadata["input_size"][-1]))
    model.eval()
    samples, labels, masks, boxes = dataset.batch()
    explainer = Explainer(model, kind=kind, input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=dataset.class_names, layer=metadata["target_layer"])
    name = metadata["architecture"]
    return Subject(name, model, explainer, samples, labels, masks, boxes)
