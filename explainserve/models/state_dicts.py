"""Loading a state-dict file into a model, with errors that name the file and the mismatch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state-dict saved with ``torch.save`` (tensors only; no pickled code is run).

    Accepts a plain state-dict, or a checkpoint dict holding it under ``"state_dict"`` or
    ``"model"``; a ``"module."`` prefix (from ``DataParallel``) is removed.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be read as a tensor dictionary; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a readable PyTorch state-dict ({type(error).__name__}: {error})") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state-dict), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, description: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly; any key or shape mismatch is a ValueError.

    Parameters
    ----------
    model
        The freshly built model.
    state
        Its weights, as read from ``path``.
    path
        The file the weights came from (for messages).
    description
        What the model is, e.g. ``"resnet18 with 10 classes"`` (for messages).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not hold weights of {description}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        shown = "; ".join(f"{k}: file {f}, model {m}" for k, f, m in wrong[:5])
        raise ValueError(f"{path}: tensor shapes do not match {description}: {shown}")
    model.load_state_dict(state)
    return model
