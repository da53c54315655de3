"""What a served model accepts: one frozen :class:`Limits`, derived once from its metadata.

The library's Explainer builds it, the handler's describe() sends it to the gateway, and the
gateway validates requests with the same object, so the two can never disagree on a range.
Importable without torch (the gateway uses it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

from .methods import DEFAULT_METHODS, IMAGE_METHODS, VIDEO_METHODS

# Superpixels requested per input, whatever its size (SLIC's cost grows with it).
MAX_SEGMENTS = 10_000
# The thesis's superpixel scale, kept whatever the input size: SWAG's 300 superpixels at 224 x 224
# (thesis 3.4, about 167 px each) and SWAG-V's 120 supervoxels on 16 frames of 112 x 112 (thesis
# 4.4.3, about 1,672 voxels each). A constant count would make superpixels of 14 px at 64 px and
# of 870 px at 512 px.
REFERENCE_SEGMENTS = {"image": (300, (224, 224)), "video": (120, (16, 112, 112))}
# The default never drops below this many superpixels (a 4 x 4 grid's worth), so a small input
# is still split into regions SWAG can rank.
MIN_DEFAULT_SEGMENTS = 16
# SLIC colour / score weights accepted (thesis eq. 3.6; the defaults are 9-20).
MAX_WEIGHT = 1000.0
# Jitter-CAM cells added per axis, as a multiple of the CAM size ((4m + 1)² patches at most).
JITTER_D_PER_CAM_CELL = 4
# Classes returned by default, and at most (an answer's size stays bounded for 1000 classes).
DEFAULT_TOP_K = 5
MAX_TOP_K = 100
# Filters per region request: each costs a forward and a backward pass.
MAX_REGION_FILTERS = 8
# Superpixels surprise suppression may delete one at a time (thesis 6.4.1 sweeps 1-100); each
# step is one more image in a batched forward pass.
MAX_SUPPRESSION_STEPS = 100


def max_segments(spatial_shape: Sequence[int]) -> int:
    """The most superpixels (supervoxels) asked of an input: one per 4 pixels, at most MAX_SEGMENTS."""
    return max(1, min(MAX_SEGMENTS, math.prod(int(v) for v in spatial_shape) // 4))


def default_segments(kind: str, spatial_shape: Sequence[int]) -> int:
    """SWAG's default superpixel count: the thesis's mean superpixel size on this input.

    ``round(K_ref * prod(spatial_shape) / prod(shape_ref))`` with the reference of
    :data:`REFERENCE_SEGMENTS` (300 at 224 x 224 for images; 120 at 16 x 112 x 112 for clips,
    so a clip scales with its frame area and its frame count), at least
    :data:`MIN_DEFAULT_SEGMENTS` and at most :func:`max_segments`.

    Parameters
    ----------
    kind : {"image", "video"}
    spatial_shape : sequence of int
        (H, W) or (T, H, W) of the network input, in pixels (and frames).

    Returns
    -------
    int
        64 x 64: 24; 112 x 112: 75; 224 x 224: 300; 512 x 512: 1,567; 16 x 64 x 64: 39.
    """
    if kind not in REFERENCE_SEGMENTS:
        raise ValueError(f"kind: expected 'image' or 'video', got {kind!r}")
    count, shape = REFERENCE_SEGMENTS[kind]
    if len(spatial_shape) != len(shape) or any(int(v) < 1 for v in spatial_shape):
        raise ValueError(f"spatial_shape: expected {len(shape)} positive sizes for a {kind} input, got {tuple(spatial_shape)}")
    scaled = round(count * math.prod(int(v) for v in spatial_shape) / math.prod(shape))
    return min(max(MIN_DEFAULT_SEGMENTS, scaled), max_segments(spatial_shape))


@dataclass(frozen=True)
class Limits:
    """The accepted ranges of one model's requests.

    Attributes
    ----------
    kind : {"image", "video"}
    methods : tuple of str
        Methods this kind of model serves.
    default_methods : tuple of str
        Methods run when a request names none (the plain TorchServe form).
    n_classes : int
        Number of logits; class ids are in [0, n_classes - 1].
    input_size : tuple of int
        (H, W) or (T, H, W) of the network input.
    cam_size : tuple of int
        Spatial size of the target layer's activation map for ``input_size``.
    num_filters : int
        Channels of the target layer; filter ids are in [0, num_filters - 1].
    max_n_segments : int
        Largest ``n_segments`` (SWAG and region superpixels).
    default_n_segments : int
        SWAG's ``n_segments`` when a request leaves it unset (:func:`default_segments`).
    max_jitter_d : int
        Largest Jitter-CAM ``d``, in CAM cells.
    max_top_k, default_top_k : int
        Classes returned at most, and when a request leaves ``top_k`` unset (0 over gRPC).
    max_region_filters : int
        Filters one region request may name.
    max_suppression_steps : int
        Largest surprise-suppression ``steps``.
    """

    kind: str
    methods: tuple[str, ...]
    default_methods: tuple[str, ...]
    n_classes: int
    input_size: tuple[int, ...]
    cam_size: tuple[int, ...]
    num_filters: int
    max_n_segments: int
    default_n_segments: int
    max_jitter_d: int
    max_top_k: int
    default_top_k: int
    max_region_filters: int = MAX_REGION_FILTERS
    max_suppression_steps: int = MAX_SUPPRESSION_STEPS

    @classmethod
    def for_model(cls, *, kind: str, input_size: Sequence[int], cam_size: Sequence[int], n_classes: int,
                  num_filters: int) -> "Limits":
        """Derive every limit from the model's kind, sizes and number of classes."""
        if kind not in DEFAULT_METHODS:
            raise ValueError(f"kind: expected 'image' or 'video', got {kind!r}")
        return cls(
            kind=kind,
            methods=IMAGE_METHODS if kind == "image" else VIDEO_METHODS,
            default_methods=DEFAULT_METHODS[kind],
            n_classes=int(n_classes),
            input_size=tuple(int(v) for v in input_size),
            cam_size=tuple(int(v) for v in cam_size),
            num_filters=int(num_filters),
            max_n_segments=max_segments(input_size),
            default_n_segments=default_segments(kind, input_size),
            max_jitter_d=JITTER_D_PER_CAM_CELL * min(int(v) for v in cam_size),
            max_top_k=min(int(n_classes), MAX_TOP_K),
            default_top_k=min(DEFAULT_TOP_K, int(n_classes)),
        )

    def as_dict(self) -> dict:
        """JSON-ready fields (tuples as lists), as the handler's describe() sends them."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, described: dict) -> "Limits":
        """The Limits a describe() answer carries (other keys are ignored)."""
        return cls(**{f.name: tuple(described[f.name]) if isinstance(described[f.name], list) else described[f.name]
                      for f in fields(cls)})

    # -- checks: ValueError naming the field and its accepted range ---------------------
    def check_methods(self, methods: Sequence[str]) -> None:
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ValueError(f"methods: {unknown} not available for {self.kind} models; accepted: {list(self.methods)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods: each method may be asked once, got {list(methods)}")

    def check_class(self, value: int | None, name: str = "target") -> None:
        """A class id (None passes: the predicted class)."""
        if value is not None and not 0 <= value < self.n_classes:
            raise ValueError(f"{name}: class id must be in [0, {self.n_classes - 1}], got {value}")

    def top_k(self, value: int | None) -> int:
        """The number of classes returned: ``default_top_k`` for None, else ``value`` if in range."""
        if value is None:
            return self.default_top_k
        if not 1 <= value <= self.max_top_k:
            raise ValueError(f"top_k: must be in [1, {self.max_top_k}] (the model has {self.n_classes} classes; "
                             f"unset means {self.default_top_k}), got {value}")
        return value

    def check_options(self, *, n_segments: int | None = None, wc: float | None = None, wg: float | None = None,
                      jitter_d: int | None = None) -> None:
        """Explicit SWAG / Jitter-CAM options (None: the default, always accepted)."""
        if n_segments is not None and (isinstance(n_segments, bool) or not 1 <= n_segments <= self.max_n_segments):
            raise ValueError(f"n_segments: must be in [1, {self.max_n_segments}] for input size {self.input_size}, "
                             f"got {n_segments}")
        for name, value in (("wc", wc), ("wg", wg)):
            check_weight(name, value)
        if jitter_d is not None and not 0 <= jitter_d <= self.max_jitter_d:
            raise ValueError(f"jitter_d: must be in [0, {self.max_jitter_d}] (cells added to the {self.cam_size} CAM), "
                             f"got {jitter_d}")

    def check_filter(self, value: int) -> None:
        if not 0 <= value < self.num_filters:
            raise ValueError(f"filter: must be in [0, {self.num_filters - 1}], got {value}")

    def check_region_request(self, filters: Sequence[int], classes: Sequence[int | None], n_segments: int,
                             suppression_steps: int) -> None:
        """A region request: 1..max_region_filters filters, their classes, SLIC size and suppression steps."""
        if not 1 <= len(filters) <= self.max_region_filters:
            raise ValueError(f"filters: a RegionRequest needs 1 to {self.max_region_filters} filters, got {len(filters)}")
        for value, class_index in zip(filters, classes):
            self.check_filter(value)
            self.check_class(class_index, "class_index")
        self.check_options(n_segments=n_segments)
        if not 0 <= suppression_steps <= self.max_suppression_steps:
            raise ValueError(f"suppression_steps: must be in [0, {self.max_suppression_steps}], got {suppression_steps}")


def check_weight(name: str, value: float | None) -> None:
    """A SLIC weight ``wc`` or ``wg`` (None passes: the default)."""
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_WEIGHT):
        raise ValueError(f"{name}: expected a weight in (0, {MAX_WEIGHT:g}], got {value!r}")
