"""Checks an ExplainRequest against the model's metadata before it is forwarded.

Raises ``ValueError`` naming the field and its accepted range (INVALID_ARGUMENT), or
:class:`explainserve.inputs.InputTooLarge` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import math

from explainserve import inputs, video_files
from explainserve._generated import explain_pb2

MAX_TOP_K = 100


def check_request(request: explain_pb2.ExplainRequest, metadata: dict) -> None:
    """Validate everything the handler would refuse but undecodable pixels (see :func:`check_input`)."""
    check_methods(request.methods, metadata)
    check_options(request, metadata)
    check_input(request, metadata)


def check_methods(methods, metadata: dict) -> None:
    accepted = metadata["methods"]
    unknown = sorted(set(methods) - set(accepted))
    if unknown:
        raise ValueError(f"methods: {unknown} not available for {metadata['kind']} model {metadata['name']!r}; accepted: {accepted}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods: each method may be asked once, got {list(methods)}")


def check_options(request: explain_pb2.ExplainRequest, metadata: dict) -> None:
    n_classes = len(metadata["class_names"])
    for name in ("target_class", "label"):
        if request.HasField(name) and not 0 <= getattr(request, name) < n_classes:
            raise ValueError(f"{name}: class id must be in [0, {n_classes - 1}], got {getattr(request, name)}")
    if not 0 <= request.top_k <= min(n_classes, MAX_TOP_K):
        raise ValueError(f"top_k: must be in [0, {min(n_classes, MAX_TOP_K)}] (0 means 5), got {request.top_k}")
    options = request.options
    if options.HasField("n_segments") and not 1 <= options.n_segments <= metadata["max_n_segments"]:
        raise ValueError(f"options.n_segments: must be in [1, {metadata['max_n_segments']}], got {options.n_segments}")
    if options.HasField("jitter_d") and not 0 <= options.jitter_d <= metadata["max_jitter_d"]:
        raise ValueError(f"options.jitter_d: must be in [0, {metadata['max_jitter_d']}] CAM cells, got {options.jitter_d}")
    for name in ("wc", "wg"):
        if options.HasField(name) and not (math.isfinite(getattr(options, name)) and 0 < getattr(options, name) <= 1000):
            raise ValueError(f"options.{name}: expected a weight in (0, 1000], got {getattr(options, name)}")


def check_input(request: explain_pb2.ExplainRequest, metadata: dict) -> None:
    """Check the input from its headers alone: format, sizes, frame count and decoded pixels.
    Nothing is decoded here (the handler decodes, and answers undecodable pixels with
    INVALID_ARGUMENT), so the gateway's memory does not grow with what the pixels decode to."""
    kind = metadata["kind"]
    given = request.WhichOneof("input")
    if given is None:
        raise ValueError("input: the request has neither `image` nor `clip`")
    if kind == "image":
        if given != "image":
            raise ValueError(f"input: model {metadata['name']!r} takes an `image`, not a clip")
        inputs.image_size(request.image)
        return
    if given != "clip":
        raise ValueError(f"input: model {metadata['name']!r} takes a `clip`, not an image")
    video_files.check_clip(request.clip, metadata["input_size"][0])
