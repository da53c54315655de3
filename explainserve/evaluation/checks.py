"""Input checks shared by the evaluation metrics.

Every metric refuses input that would otherwise yield a silent, meaningless number:
an empty batch, a map whose shape does not match its image, or a map with NaN/inf.
"""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(array, name: str) -> np.ndarray:
    """Return ``array`` (tensor or array-like) as a NumPy array, detached and on the CPU."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array or tensor, got {type(array).__name__}") from error


def check_batch(name: str, array, ndims: tuple[int, ...]) -> None:
    """Raise ValueError unless ``array`` has one of ``ndims`` dimensions and a non-empty batch."""
    if array.ndim not in ndims:
        wanted = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {wanted} dimensions (batch first), got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: the metric needs at least one sample")


def check_finite(name: str, array) -> None:
    """Raise ValueError naming the first sample of ``array`` that holds NaN or inf."""
    values = array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array, dtype=np.float64))
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bad.any():
        raise ValueError(f"{name} holds NaN or inf values (sample {int(bad.nonzero()[0, 0])}); refusing to score it")


def check_same_spatial(map_name: str, maps, ref_name: str, ref_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``maps`` is (B, *ref_shape[1:])-shaped with the same batch size."""
    if tuple(maps.shape[0:1]) != tuple(ref_shape[0:1]):
        raise ValueError(f"{map_name} has {maps.shape[0]} samples but {ref_name} has {ref_shape[0]}")
    if tuple(maps.shape[1:]) != tuple(ref_shape[1:]):
        raise ValueError(
            f"{map_name} has spatial shape {tuple(maps.shape[1:])} but {ref_name} has {tuple(ref_shape[1:])}"
        )


def check_targets(target, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Return ``target`` as a (B,) long tensor, raising ValueError if its size or range is wrong."""
    target = torch.as_tensor(target).long().reshape(-1)
    if target.numel() != batch:
        raise ValueError(f"target must hold one class per sample ({batch}), got {target.numel()}")
    if num_classes is not None and ((target < 0) | (target >= num_classes)).any():
        raise ValueError(f"target classes must lie in [0, {num_classes - 1}], got {target.tolist()}")
    return target
