"""Checks an ExplainRequest against the model's metadata before it is forwarded.

Raises ``ValueError`` naming the field and its accepted range (INVALID_ARGUMENT), or
:class:`explainserve.inputs.InputTooLarge` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from explainserve import inputs, video_files
from explainserve._generated import explain_pb2
from explainserve.limits import Limits


def check_request(request: explain_pb2.ExplainRequest, metadata: dict) -> None:
    """Validate everything the handler would refuse but undecodable pixels (see :func:`check_input`).

    ``metadata`` is the handler's describe(): the model's name and class names beside its
    :class:`~explainserve.limits.Limits` fields, which decide every range.
    """
    limits = Limits.from_dict(metadata)
    check_methods(request.methods, limits)
    check_options(request, limits)
    check_input(request, metadata)


def check_methods(methods, limits: Limits) -> None:
    limits.check_methods(list(methods))


def check_options(request: explain_pb2.ExplainRequest, limits: Limits) -> None:
    for name in ("target_class", "label"):
        limits.check_class(getattr(request, name) if request.HasField(name) else None, name)
    limits.top_k(request.top_k or None)  # 0: the model's default
    options = request.options
    try:
        limits.check_options(**{name: getattr(options, name) if options.HasField(name) else None
                                for name in ("n_segments", "wc", "wg", "jitter_d")})
    except ValueError as error:
        raise ValueError(f"options.{error}") from None


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
