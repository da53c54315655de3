"""Where the network passes run: the device TorchServe gives a worker, and a model's own device.

Only the network passes (probe, Jitter-CAM's patches, surprise regions) run there; SLIC,
segment means and everything the answers carry are computed on the CPU, in numpy.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def serving_device(gpu_id: int | str | None) -> torch.device:
    """The device of a TorchServe worker whose context says ``system_properties["gpu_id"]``.

    Parameters
    ----------
    gpu_id : int, str or None
        The GPU TorchServe assigned to the worker; None when it runs on CPUs.

    Returns
    -------
    torch.device
        ``cuda:<gpu_id>`` when a GPU was assigned and CUDA is available, else ``cpu`` (with a
        warning when a GPU was assigned but this torch cannot use it).
    """
    if gpu_id is None or gpu_id == "":
        return torch.device("cpu")
    index = int(gpu_id)
    if index < 0:
        raise ValueError(f"gpu_id: expected a GPU index >= 0, got {gpu_id!r}")
    if not torch.cuda.is_available():
        log.warning("TorchServe assigned GPU %d but CUDA is not available to torch: running on the CPU", index)
        return torch.device("cpu")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
