"""Serving a one-logit (sigmoid) binary classifier as a classifier of two classes.

A binary classifier trained with ``BCEWithLogitsLoss`` returns one logit z per input, P(class 1)
= σ(z). Everything served is per class (the softmax, the class explained, the per-class
distributions), and a softmax over one logit is 1 whatever the input. Returning the two logits

    (-z / 2, z / 2)

changes nothing the model says: their softmax is (1 - σ(z), σ(z)), and the prediction is class 1
exactly when z > 0. Explaining class 1 follows dz/dA / 2 and class 0 its opposite, so class 0's
Grad-CAM shows where the evidence against class 1 lies, as a two-row head (-w / 2, w / 2) would.
"""

from __future__ import annotations

import torch
from torch import nn

#: The attribute that marks a model already adapted (its hook's handle).
_HANDLE = "_explainserve_one_logit_hook"


def _two_logits(module: nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
    # A module-level function, so that an adapted model still pickles and deep-copies. (B,) and
    # () logits (a forward ending in squeeze) become (B, 1) first.
    half = logits.reshape(-1, 1) / 2
    return torch.cat([-half, half], dim=1)


def served_as_two_classes(model: nn.Module) -> nn.Module:
    """Make ``model``, which returns (B, 1) logits z (or (B,), as after ``squeeze``), return (B, 2)
    logits (-z / 2, z / 2).

    A forward hook on ``model`` itself does it, so its layers keep their dotted names and its
    ``state_dict`` its keys (the same weights file loads before and after). Adapting a model
    twice changes nothing more.

    Parameters
    ----------
    model : nn.Module
        A classifier returning (B, 1) or (B,) logits.

    Returns
    -------
    nn.Module
        ``model``, adapted in place.
    """
    if getattr(model, _HANDLE, None) is None:
        setattr(model, _HANDLE, model.register_forward_hook(_two_logits))
    return model
