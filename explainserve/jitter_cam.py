"""Jitter-CAM (thesis §5.3, eq. 5.1-5.3): a CAM of higher resolution from patches of an upscaled image.

The CAM of an m_h x m_w activation map covers k = p/m input pixels per cell. The image is
upscaled bilinearly so that it spans m + d cells per axis, patches of the original size are
taken every ``stride`` cells, and the CAM of each patch is added into a (m_h+d_h) x (m_w+d_w)
grid J at its cell offset, with a count map C. J / C is resized to the input size.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .cam import CamWeights, class_activation_map, gradcam_weights, upsample
from .limits import JITTER_D_PER_CAM_CELL
from .layers import resolve_layer
from .probe import check_inputs, probe


def _pair(value, name: str) -> tuple[int, int]:
    values = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return values


def patch_offsets(d: int, stride: int) -> list[int]:
    """Cell offsets 0, stride, 2*stride, ... of the patches along one axis, always ending at d."""
    offsets = list(range(0, d + 1, stride))
    if offsets[-1] != d:
        offsets.append(d)
    return offsets


def jitter_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    cam_size: tuple[int, int],
    layer: str | None = None,
    d: int | tuple[int, int] | None = None,
    stride: int = 1,
    batch_size: int = 64,
    weights: CamWeights = gradcam_weights,
) -> torch.Tensor:
    """Jitter-CAM of ``target`` for each image, at input resolution.

    Parameters
    ----------
    model : nn.Module
        Image classifier returning logits.
    inputs : Tensor, shape (B, C, H, W)
        Normalised images.
    target : LongTensor, shape (B,)
        Class to explain per image: the class predicted on the original image.
    cam_size : (int, int)
        Size (m_h, m_w) of the target layer's activation map for an input of size (H, W),
        e.g. ``probe_result.activations.shape[-2:]``.
    layer : str, optional
        Target layer (dotted module name); default as in :func:`explainserve.probe.probe`.
    d : int or (int, int), optional
        Cells added per axis. Default ``cam_size`` (double resolution: 64 patches for 7x7).
        ``d = 0`` is plain Grad-CAM.
    stride : int
        Step between patches, in cells (1 = the thesis's stride of k pixels).
    batch_size : int
        Patches per network pass.
    weights : callable
        Channel weighting of each patch CAM; Grad-CAM's by default.

    Returns
    -------
    Tensor, shape (B, H, W), float32, unnormalised.
    """
    check_inputs(inputs, model)
    if inputs.ndim != 4:
        raise ValueError(f"inputs: Jitter-CAM takes images (B, C, H, W), got rank {inputs.ndim}")
    m_h, m_w = _pair(tuple(int(v) for v in cam_size), "cam_size")
    d_h, d_w = _pair(d, "d") if d is not None else (m_h, m_w)
    if d_h < 0 or d_w < 0:
        raise ValueError(f"d: must be >= 0 (cells added per axis), got {(d_h, d_w)}")
    if d_h > JITTER_D_PER_CAM_CELL * m_h or d_w > JITTER_D_PER_CAM_CELL * m_w:
        raise ValueError(f"d: at most {JITTER_D_PER_CAM_CELL} x the CAM size {(m_h, m_w)} per axis, got {(d_h, d_w)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: must be an int >= 1 (cells), got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")

    batch, _, height, width = inputs.shape
    cell_h, cell_w = height / m_h, width / m_w
    upscaled = F.interpolate(
        inputs, size=(round(height + d_h * cell_h), round(width + d_w * cell_w)), mode="bilinear", align_corners=False
    )
    offsets = list(itertools.product(patch_offsets(d_h, stride), patch_offsets(d_w, stride)))
    # Pixel offset of each patch, clamped so that rounding never runs past the upscaled image.
    pixels = [
        (min(round(i * cell_h), upscaled.shape[2] - height), min(round(j * cell_w), upscaled.shape[3] - width))
        for i, j in offsets
    ]
    patches = torch.stack([upscaled[:, :, y : y + height, x : x + width] for y, x in pixels], dim=1)
    patches = patches.reshape(batch * len(offsets), *inputs.shape[1:])
    patch_targets = torch.as_tensor(target, dtype=torch.long).reshape(-1).repeat_interleave(len(offsets))

    # The default layer rule runs the model once: apply it once, not once per chunk.
    layer = resolve_layer(model, layer, inputs[:1])[0]
    cams = []
    for start in range(0, patches.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        result = probe(model, patches[chunk], layer=layer, target=patch_targets[chunk], input_gradient=False)
        if tuple(result.activations.shape[-2:]) != (m_h, m_w):
            raise ValueError(f"cam_size: the layer's map is {tuple(result.activations.shape[-2:])}, not {(m_h, m_w)}")
        cams.append(class_activation_map(result.activations, result.activation_gradients, weights))
    cams = torch.cat(cams).reshape(batch, len(offsets), m_h, m_w)

    total = torch.zeros(batch, m_h + d_h, m_w + d_w, device=cams.device)
    count = torch.zeros(m_h + d_h, m_w + d_w, device=cams.device)
    for index, (i, j) in enumerate(offsets):
        total[:, i : i + m_h, j : j + m_w] += cams[:, index]
        count[i : i + m_h, j : j + m_w] += 1
    return upsample(total / count, (height, width))
