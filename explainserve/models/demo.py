"""Loading the committed demo models (weights + metadata under ``explainserve/models/weights``)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .architectures import DEMO_ARCHITECTURES
from .state_dicts import load_checked, read_state_dict
from .training import WEIGHTS_DIR, check_kind

METADATA_KEYS = ("architecture", "input_size", "mean", "std", "class_names", "target_layer",
                 "training_command", "seed", "test_accuracy", "ood_accuracy", "created")


def load_demo_model(kind: str, weights_dir: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, dict]:
    """Load a trained demo model and its metadata.

    Parameters
    ----------
    kind
        "image" (FashionVGG, 8 FashionScenes classes, input (3, 64, 64)), "image_large"
        (FashionVGG512, the same classes, input (3, 112, 112), 512 filters at the target layer) or
        "video" (MotionC3D, 8 MovingFashion motions, input (3, 16, 64, 64)).
    weights_dir
        Folder holding ``<kind>.pt`` and ``<kind>.json``.

    Returns
    -------
    model : torch.nn.Module
        In eval mode, on the CPU; takes RGB in [0, 1] normalised by ``mean``/``std``.
    metadata : dict
        At least :data:`METADATA_KEYS`; ``input_size`` is [H, W] or [T, H, W].

    Raises
    ------
    FileNotFoundError
        If the files are missing (train them with ``explainserve train-demo <kind>``).
    ValueError
        If the metadata lacks keys or the weights do not fit the architecture it names.
    """
    check_kind(kind)
    stem = Path(weights_dir) / kind
    metadata_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if not metadata_path.is_file():
        raise FileNotFoundError(f"demo model metadata {metadata_path} does not exist; "
                                f"train it with `explainserve train-demo {kind}`")
    metadata = json.loads(metadata_path.read_text())
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"{metadata_path}: metadata lacks keys {missing}")
    if metadata["architecture"] not in DEMO_ARCHITECTURES:
        raise ValueError(f"{metadata_path}: unknown architecture {metadata['architecture']!r}; "
                         f"accepted: {tuple(DEMO_ARCHITECTURES)}")
    classes = len(metadata["class_names"])
    model = DEMO_ARCHITECTURES[metadata["architecture"]](num_classes=classes)
    load_checked(model, read_state_dict(weights_path), weights_path, f"{metadata['architecture']} with {classes} classes")
    return model.eval(), metadata
