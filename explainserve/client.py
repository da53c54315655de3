"""ExplainClient: the Python SDK for the gateway's ``explainserve.v1.Explainer`` API.

    with ExplainClient("127.0.0.1:50051") as client:
        result = client.explain("cat.png", model="demo_image", methods=["swag_i_g"], timeout=10)
        result.maps["swag_i_g"].heatmap   # float32 (H, W)
        result.anomaly.predicted.verdict  # ClassVerdict.NORMAL / ANOMALOUS when anomaly.status is OK
        report = client.score(alpha, model="demo_image", predicted_class=3)  # Score RPC

Errors are raised as :class:`ExplainError`, carrying the gRPC status code. A gateway with TLS
and API keys: ``ExplainClient(target, tls_ca="ca.pem", token=key)`` (or $EXPLAINSERVE_TOKEN).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
from PIL import Image

from explainserve import wire
from explainserve._generated import explain_pb2, explain_pb2_grpc
from explainserve.video_files import VIDEO_SUFFIXES
from explainserve.wire import MAX_MESSAGE_BYTES  # re-exported for clients

# The API key a client sends when none is given to it.
TOKEN_ENV = "EXPLAINSERVE_TOKEN"
# gRPC's reconnect backoff grows to 120 s; capped, a restarted gateway is found again within ~2 s.
MAX_RECONNECT_BACKOFF_MS = 2000


class ExplainError(Exception):
    """A failed call; ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class MapResult:
    """One method's map. heatmap: float32 (H, W) or (T, H, W); SWAG adds segments and scores."""

    heatmap: np.ndarray
    segments: np.ndarray | None = None
    segment_scores: np.ndarray | None = None
    quantisation_step: float = 0.0  # the heatmap's uint8 step; values are within half of it


@dataclass
class ExplainResult:
    model: str
    model_version: str
    classes: list[tuple[int, str, float]]  # (index, name, softmax score), best first
    predicted_class: int
    target_class: int
    maps: dict[str, MapResult]
    anomaly: explain_pb2.AnomalyReport
    timings: dict[str, float]  # seconds, plus batch_size

    @classmethod
    def from_response(cls, response: explain_pb2.ExplainResponse) -> "ExplainResult":
        maps = {}
        for explanation in response.explanations:
            has_segments = explanation.HasField("segments")
            maps[explanation.method] = MapResult(
                heatmap=wire.to_numpy(explanation.heatmap),
                segments=wire.to_numpy(explanation.segments).astype(np.int32) if has_segments else None,
                segment_scores=wire.to_numpy(explanation.segment_scores) if has_segments else None,
                quantisation_step=explanation.heatmap.scale,
            )
        timings = {field.name: value for field, value in response.timings.ListFields()}
        return cls(
            model=response.model, model_version=response.model_version,
            classes=[(c.index, c.name, c.score) for c in response.classes],
            predicted_class=response.predicted_class, target_class=response.target_class,
            maps=maps, anomaly=response.anomaly, timings=timings,
        )


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_request(data, *, model: str, methods: Sequence[str] = (), n_segments: int | None = None,
                  wc: float | None = None, wg: float | None = None, jitter_d: int | None = None,
                  target_class: int | None = None, label: int | None = None, top_k: int | None = None,
                  model_version: str = "", explain_anomaly: bool | None = None) -> explain_pb2.ExplainRequest:
    """An ExplainRequest for an image or a clip.

    Parameters
    ----------
    data : bytes, path, ndarray or list of bytes
        Encoded image bytes or a path to an image or a video file (MP4, WebM, AVI: sent as
        ``Clip.video``); a uint8 (H, W, 3) array (sent as PNG); a uint8
        (T, H, W, 3) array (sent raw as a clip); or a list of encoded frames (a clip).
    top_k : int, optional
        Classes returned; None asks for the model's default, min(5, number of classes).
    """
    options = explain_pb2.ExplainOptions()
    for name, value in (("n_segments", n_segments), ("wc", wc), ("wg", wg), ("jitter_d", jitter_d)):
        if value is not None:
            setattr(options, name, value)
    request = explain_pb2.ExplainRequest(model=model, model_version=model_version, methods=list(methods),
                                         options=options, top_k=top_k or 0)
    if target_class is not None:
        request.target_class = target_class
    if label is not None:
        request.label = label
    if explain_anomaly is not None:  # unset: the gateway's --explain-anomaly default
        request.explain_anomaly = explain_anomaly
    if isinstance(data, (str, Path)) and Path(data).suffix.lower() in VIDEO_SUFFIXES:
        request.clip.video = Path(data).read_bytes()
    elif isinstance(data, (str, Path)):
        request.image = Path(data).read_bytes()
    elif isinstance(data, (bytes, bytearray)):
        request.image = bytes(data)
    elif isinstance(data, np.ndarray) and data.ndim == 3:
        request.image = encode_png(data)
    elif isinstance(data, np.ndarray) and data.ndim == 4:
        clip = np.ascontiguousarray(data, dtype=np.uint8)
        request.clip.raw, request.clip.shape[:] = clip.tobytes(), list(clip.shape)
    elif isinstance(data, (list, tuple)):
        request.clip.frames.extend(bytes(frame) for frame in data)
    else:
        raise ValueError(f"data: expected image bytes, a path, an (H, W, 3) or (T, H, W, 3) uint8 array, "
                         f"or a list of encoded frames; got {type(data).__name__}")
    return request


def score_request(alpha, *, model: str, predicted_class: int, label: int | None = None, label_alpha=None,
                  model_version: str = "") -> explain_pb2.ScoreRequest:
    """A ScoreRequest: ``alpha`` (K,) computed for ``predicted_class``, ``label_alpha`` for ``label``."""
    request = explain_pb2.ScoreRequest(model=model, model_version=model_version, predicted_class=predicted_class,
                                       alpha=np.asarray(alpha, dtype=np.float32).tolist())
    if label is not None:
        request.label = label
    if label_alpha is not None:
        request.label_alpha.extend(np.asarray(label_alpha, dtype=np.float32).tolist())
    return request


def read_optional(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class ExplainClient:
    """A blocking client of one gateway at ``target`` ("host:port").

    Parameters
    ----------
    tls : bool
        Connect with TLS, trusting the system's CAs (implied by ``tls_ca`` and a client certificate).
    tls_ca : path, optional
        PEM of the CA that signed the gateway's certificate.
    tls_client_cert, tls_client_key : path, optional
        PEM certificate chain and key of this client, for a gateway that requires them (mutual TLS).
    token : str, optional
        API key sent as ``authorization: Bearer <token>``; default: $EXPLAINSERVE_TOKEN, if set.
    """

    def __init__(self, target: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES, tls: bool = False,
                 tls_ca: str | Path | None = None, tls_client_cert: str | Path | None = None,
                 tls_client_key: str | Path | None = None, token: str | None = None):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        if tls or tls_ca is not None or tls_client_cert is not None:
            credentials = grpc.ssl_channel_credentials(read_optional(tls_ca), read_optional(tls_client_key),
                                                       read_optional(tls_client_cert))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = explain_pb2_grpc.ExplainerStub(self.channel)

    def explain(self, data, *, model: str, methods: Sequence[str] = (), timeout: float | None = None,
                **request_fields) -> ExplainResult:
        """Explain one image or clip; see :func:`build_request` for ``data`` and the fields."""
        return self.send(build_request(data, model=model, methods=methods, **request_fields), timeout=timeout)

    def send(self, request: explain_pb2.ExplainRequest, *, timeout: float | None = None) -> ExplainResult:
        return ExplainResult.from_response(self._call(self.stub.Explain, request, timeout))

    def score(self, alpha, *, model: str, predicted_class: int, label: int | None = None, label_alpha=None,
              model_version: str = "", timeout: float | None = None) -> explain_pb2.AnomalyReport:
        """Anomaly verdict for Grad-AMap filter scores computed elsewhere (the ``Score`` RPC)."""
        return self._call(self.stub.Score, score_request(alpha, model=model, predicted_class=predicted_class, label=label,
                                                         label_alpha=label_alpha, model_version=model_version), timeout)

    def score_batch(self, requests: Sequence[explain_pb2.ScoreRequest], *,
                    timeout: float | None = None) -> list[explain_pb2.AnomalyReport]:
        """Verdicts for up to 4096 :func:`score_request` s in one ``ScoreBatch`` call."""
        return list(self._call(self.stub.ScoreBatch, explain_pb2.ScoreBatchRequest(requests=requests), timeout).reports)

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise ExplainError(error.code(), error.details()) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ExplainClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
