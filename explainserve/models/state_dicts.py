"""Loading a state-dict file into a model, with errors that name the file and the mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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
        Its weights, as read from ``path``; when the keys carry a wrapper's prefix (see
        :func:`unwrapped`), the entries under it.
    path
        The file the weights came from (for messages).
    description
        What the model is, e.g. ``"resnet18 with 10 classes"`` (for messages).
    """
    expected = model.state_dict()
    state = unwrapped(state, expected, path)
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


def unwrapped(state: dict[str, torch.Tensor], expected: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The entries of ``state`` meant for a model with ``expected``'s keys.

    ``state`` itself when it holds every expected key. Else the entries under the key prefix
    whose removal gives exactly the expected keys: a wrapper's checkpoint, such as
    ``torch.compile``'s (``_orig_mod.``) or a Lightning module's (``model.``, its attribute),
    whose other entries (a loss's buffers) are left out. Failing that, the entries under the
    prefix that gives the most expected keys, when it gives more than ``state`` does, so that
    :func:`load_checked` names the keys really missing; else ``state``.

    Raises
    ------
    ValueError
        When several prefixes hold the model's weights (an EMA copy beside the trained one):
        which to serve is the user's choice.
    """
    wanted = set(expected)
    if wanted <= set(state):
        return state
    prefixes = set()
    for key in state:
        parts = key.split(".")
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts)) if ".".join(parts[i:]) in wanted)
    # The entries under each prefix, with it removed, in prefix order (so ties go to the first).
    candidates = {prefix: {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                  for prefix in sorted(prefixes)}
    exact = [prefix for prefix, entries in candidates.items() if entries.keys() == wanted]
    if len(exact) > 1:
        raise ValueError(f"{path}: holds the model's weights {len(exact)} times, under the key prefixes {exact}; "
                         f"save the copy to serve alone, e.g. torch.save({{k[len(p):]: v for k, v in state.items() "
                         f"if k.startswith(p)}}, path) with p = {exact[0]!r}")
    if exact:
        return candidates[exact[0]]
    best = max(candidates.values(), key=lambda entries: len(wanted & entries.keys()), default=None)
    if best is not None and len(wanted & best.keys()) > len(wanted & state.keys()):
        return best
    return state


def read_classifier_state(build: Callable[[int], nn.Module], path: str | Path,
                          what: str) -> tuple[dict[str, torch.Tensor], int]:
    """Read the weights file ``path`` of the classifier ``build(num_classes)`` makes, and the class
    count its head gives.

    The head tensors are found as those whose shape follows the class count (the model built
    with 3 and with 5 classes), so every architecture's head (``fc``, ``classifier.1``,
    ``head.fc``, a SqueezeNet's 1x1 convolution, auxiliary heads) is found the same way, by no name.

    Parameters
    ----------
    build
        Builds the untrained model with the given number of classes.
    path
        The state-dict file.
    what
        What the model is, e.g. ``"resnet18"`` (for messages).

    Returns
    -------
    state : dict
        The file's entries for the model's keys (see :func:`unwrapped`).
    classes : int
        The rows of the head tensors.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is unreadable, lacks the head tensors or they disagree on the count; the
        message names the file and the head tensors.
    """
    built = [build(count).state_dict() for count in (3, 5)]
    head = [key for key, tensor in built[0].items() if tensor.shape != built[1][key].shape]
    state = unwrapped(read_state_dict(path), built[0], path)
    absent = [key for key in head if key not in state]
    if absent:
        raise ValueError(f"{path}: does not hold {what} weights: no head tensors {absent} (first keys: {list(state)[:5]})")
    counts = sorted({int(state[key].shape[0]) for key in head if state[key].ndim})
    if len(counts) != 1:
        raise ValueError(f"{path}: cannot read a class count from the {what} head tensors {head} (found rows {counts})")
    return state, counts[0]
