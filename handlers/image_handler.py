"""TorchServe handler for image classifiers (see explain_handler.py)."""

from __future__ import annotations

import numpy as np
from explain_handler import ExplainHandler

from explainserve.inputs import decode_image


class ImageHandler(ExplainHandler):
    kind = "image"

    def decode_request(self, request) -> np.ndarray:
        if request.WhichOneof("input") != "image":
            raise ValueError("image: this is an image model; send `image`, not a clip")
        return decode_image(request.image)

    def decode_plain(self, payload: bytes) -> np.ndarray:
        return decode_image(payload)
