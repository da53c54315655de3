"""One Limits decides every range: the gateway and the library accept exactly the same requests."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torchvision

from explainserve.client import build_request
from explainserve.explainer import ExplainOptions, Explainer
from explainserve.limits import MAX_TOP_K, MIN_DEFAULT_SEGMENTS, Limits, default_segments
from explainserve.sidecar.validation import check_request
from support.serving_harness import png, random_image


@pytest.fixture(scope="module")
def explainer():
    # 6 classes, 64 x 64 input, a 2 x 2 CAM: max n_segments 1024, max jitter_d 8, top-k 5 by default.
    model = torchvision.models.resnet18(weights=None, num_classes=6)
    return Explainer(model, kind="image", input_size=(64, 64), mean=[0.5] * 3, std=[0.25] * 3,
                     class_names=[f"c{i}" for i in range(6)])


def described(explainer) -> dict:
    """What the gateway gets from the handler's describe(), through JSON."""
    return json.loads(json.dumps({"name": "m", "class_names": explainer.class_names, **explainer.limits.as_dict()}))


def test_limits_derive_from_the_model(explainer):
    limits = explainer.limits
    assert (limits.n_classes, limits.input_size, limits.cam_size, limits.num_filters) == (6, (64, 64), (2, 2), 512)
    assert (limits.max_n_segments, limits.max_jitter_d, limits.max_top_k, limits.default_top_k) == (1024, 8, 6, 5)
    assert limits.default_n_segments == 24 and described(explainer)["default_n_segments"] == 24
    assert Limits.from_dict(described(explainer)) == limits
    with pytest.raises(Exception):  # frozen: nobody changes a range after the fact
        limits.max_top_k = 100
    many = Limits.for_model(kind="video", input_size=(8, 112, 112), cam_size=(2, 4, 4), n_classes=1000, num_filters=8)
    assert (many.max_top_k, many.default_top_k, many.max_jitter_d) == (MAX_TOP_K, 5, 8)
    assert Limits.for_model(kind="image", input_size=(8, 8), cam_size=(1, 1), n_classes=3, num_filters=4).default_top_k == 3


GRID = {
    "methods": [[], ["grad_cam"], ["swag_i", "jitter_cam"], ["swag_v_i"], ["grad_cam", "grad_cam"]],
    "top_k": [0, 1, 6, 7, -1],
    "n_segments": [None, 0, 1024, 1025],
    "jitter_d": [None, -1, 8, 9],
    "wc": [None, 0.0, 1000.0, 1001.0, math.nan],
    "target_class": [None, -1, 5, 6],
    "label": [None, 6],
}


def refusal(check) -> str | None:
    try:
        check()
    except ValueError as error:
        return str(error).removeprefix("options.")
    return None


def test_gateway_and_library_accept_the_same_requests(explainer):
    metadata = described(explainer)
    image = png(random_image(3, size=(64, 64)))
    accepted = 0
    for values in itertools.product(*GRID.values()):
        fields = dict(zip(GRID, values))
        request = build_request(image, model="m", **fields)
        options = ExplainOptions(n_segments=fields["n_segments"], wc=fields["wc"], jitter_d=fields["jitter_d"],
                                 top_k=fields["top_k"] or None)
        gateway = refusal(lambda: check_request(request, metadata))
        library = refusal(lambda: explainer.check_request(fields["methods"], options, fields["target_class"],
                                                          fields["label"]))
        # The gateway speaks of target_class where the library says target; the range is the same.
        assert gateway == (library and library.replace("target:", "target_class:", 1)), fields
        accepted += gateway is None
    # methods 3 x top_k 3 x n_segments 2 x jitter_d 2 x wc 2 x target_class 2 x label 1
    assert accepted == 3 * 3 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("kind,shape,expected", [
    # 300 superpixels at 224 x 224 (167.25 px each): the count follows the area.
    ("image", (224, 224), 300), ("image", (64, 64), 24), ("image", (112, 112), 75), ("image", (96, 96), 55),
    ("image", (512, 512), 1567), ("image", (224, 448), 600),
    # 120 supervoxels at 16 x 112 x 112: the count follows the frame area and the frame count.
    ("video", (16, 112, 112), 120), ("video", (8, 112, 112), 60), ("video", (32, 112, 112), 240),
    ("video", (16, 56, 56), 30), ("video", (16, 64, 64), 39), ("video", (16, 224, 224), 480),
    # the floor, then the one-per-4-pixels ceiling of tiny inputs
    ("image", (32, 32), MIN_DEFAULT_SEGMENTS), ("video", (4, 32, 32), MIN_DEFAULT_SEGMENTS), ("image", (6, 6), 9),
])
def test_default_superpixel_count_keeps_the_thesis_superpixel_size(kind, shape, expected):
    assert default_segments(kind, shape) == expected
    limits = Limits.for_model(kind=kind, input_size=shape, cam_size=(1,) * len(shape), n_classes=3, num_filters=4)
    assert limits.default_n_segments == expected <= limits.max_n_segments
    limits.check_options(n_segments=limits.default_n_segments)  # the default is always a valid request


def test_default_superpixel_count_refuses_a_shape_of_the_wrong_kind():
    with pytest.raises(ValueError, match="kind: expected 'image' or 'video'"):
        default_segments("audio", (64, 64))
    with pytest.raises(ValueError, match=r"spatial_shape: expected 3 positive sizes for a video input"):
        default_segments("video", (64, 64))
