"""TorchServe handler for video classifiers (see explain_handler.py).

A plain request's ``data`` is a ``.npy`` file holding a uint8 (T, H, W, 3) clip.
"""

from __future__ import annotations

import io

import numpy as np
from explain_handler import ExplainHandler

from explainserve.inputs import raw_clip
from explainserve.video_files import decode_clip


class VideoHandler(ExplainHandler):
    kind = "video"

    def decode_request(self, request) -> np.ndarray:
        if request.WhichOneof("input") != "clip":
            raise ValueError("clip: this is a video model; send `clip`, not an image")
        return decode_clip(request.clip, self.explainer.input_size[0])

    def decode_plain(self, payload: bytes) -> np.ndarray:
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"data: expected a .npy file holding a uint8 (T, H, W, 3) clip: {error}") from None
        if array.dtype != np.uint8:
            raise ValueError(f"data: clip must be uint8, got {array.dtype}")
        return raw_clip(array.tobytes(), array.shape, self.explainer.input_size[0])
