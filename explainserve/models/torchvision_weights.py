"""Loading user-supplied torchvision weights from a local file (no network)."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import nn

from .one_logit import served_as_two_classes
from .state_dicts import load_checked, read_classifier_state


def supported_architectures() -> tuple[str, ...]:
    """Names of the torchvision image and video classification architectures."""
    image = torchvision.models.list_models(module=torchvision.models)
    video = torchvision.models.list_models(module=torchvision.models.video)
    return tuple(sorted(image + video))


def load_torchvision_weights(architecture: str, path: str | Path, num_classes: int | None = None) -> nn.Module:
    """Build a torchvision classifier and load its weights from a local state-dict file.

    The model is built with ``weights=None`` (nothing is downloaded), then the file is loaded
    strictly. Files written by ``torch.save(model.state_dict(), path)`` work, as do
    torchvision's own pretrained ``.pth`` files copied to the machine.

    Parameters
    ----------
    architecture
        A torchvision classification name, e.g. ``"resnet50"``, ``"vgg16"``,
        ``"mobilenet_v3_large"``, or a video one (``"r3d_18"``, ``"mc3_18"``, ``"r2plus1d_18"``).
    path
        The state-dict file.
    num_classes
        Classes of the head. None: read from the file's classifier weight. Given: must match it.

    Returns
    -------
    torch.nn.Module
        The model in eval mode, on the CPU. A file whose head has one row (a sigmoid binary
        classifier) gives a model adapted by
        :func:`~explainserve.models.one_logit.served_as_two_classes`: it returns the two logits
        (-z / 2, z / 2), so that the Explainer serves it as two classes, as ``explainserve
        archive`` does.

    Raises
    ------
    ValueError
        If the architecture is unknown (the message lists the accepted names), if the file
        holds another architecture's weights (missing/unexpected keys), or if the class count
        differs from ``num_classes``; messages name the file and the mismatch.
    FileNotFoundError
        If ``path`` does not exist.
    """
    accepted = supported_architectures()
    if architecture not in accepted:
        raise ValueError(f"architecture: unknown torchvision classifier {architecture!r}; accepted: {', '.join(accepted)}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes: must be a positive integer or None, got {num_classes!r}")
    state, file_classes = read_classifier_state(
        lambda count: torchvision.models.get_model(architecture, weights=None, num_classes=count), path, architecture)
    if num_classes is not None and num_classes != file_classes:
        raise ValueError(f"{path}: class-count mismatch: the file's {architecture} head has "
                         f"{file_classes} classes, num_classes={num_classes}")
    model = torchvision.models.get_model(architecture, weights=None, num_classes=file_classes)
    model = load_checked(model, state, path, f"{architecture} with {file_classes} classes").eval()
    return served_as_two_classes(model) if file_classes == 1 else model
