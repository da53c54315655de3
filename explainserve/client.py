"""ExplainClient: the Python SDK for the gateway's ``explainserve.v1.Explainer`` API.

    with ExplainClient("127.0.0.1:50051") as client:
        result = client.explain("cat.png", model="demo_image", methods=["swag_i_g"], timeout=10)
        result.maps["swag_i_g"].heatmap   # float32 (H, W)
        result.anomaly.predicted.verdict  # ClassVerdict.NORMAL / ANOMALOUS when anomaly.status is OK
        report = client.score(alpha, model="demo_image", predicted_class=3)  # Score RPC
        scores = client.score_all(alphas, classes, model="demo_image")  # (N, K) in bulk: ScoreStream
        scores.anomalous, scores.p_value                                 # (N,) arrays

Errors are raised as :class:`ExplainError`, carrying the gRPC status code. A gateway with TLS
and API keys: ``ExplainClient(target, tls_ca="ca.pem", token=key)`` (or $EXPLAINSERVE_TOKEN).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np
from PIL import Image

from explainserve import wire
from explainserve._generated import explain_pb2, explain_pb2_grpc
from explainserve.anomaly.conformal import TESTS as GRAD_AMAP_TESTS
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
    classes: list[tuple[int, str, float]]  # (index, name, score: softmax, or sigmoid if multi-label), best first
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
                  features=None, model_version: str = "") -> explain_pb2.ScoreRequest:
    """A ScoreRequest: ``alpha`` (K,) computed for ``predicted_class``, ``label_alpha`` for
    ``label``; ``features`` (K,), optional, the pooled features of the same input (the feature
    tests: :attr:`explainserve.explainer.FilterScores.features`)."""
    request = explain_pb2.ScoreRequest(model=model, model_version=model_version, predicted_class=predicted_class,
                                       alpha=np.asarray(alpha, dtype=np.float32).tolist())
    if label is not None:
        request.label = label
    if label_alpha is not None:
        request.label_alpha.extend(np.asarray(label_alpha, dtype=np.float32).tolist())
    if features is not None:
        request.features.extend(np.asarray(features, dtype=np.float32).ravel().tolist())
    return request


def float32_rows(values, name: str, rows: int | None = None) -> explain_pb2.Tensor:
    """The FLOAT32 Tensor of an (N, K) array named ``name``; ``rows``, when given, must be N."""
    values = np.ascontiguousarray(values, dtype="<f4")
    if values.ndim != 2 or (rows is not None and len(values) != rows):
        wanted = "an (N, K) array" if rows is None else f"a ({rows}, K) array, one row per alpha row"
        raise ValueError(f"{name}: expected {wanted}, got shape {values.shape}")
    return explain_pb2.Tensor(shape=list(values.shape), dtype=explain_pb2.Tensor.FLOAT32, data=values.tobytes())


def columns_request(alpha, classes, *, model: str, model_version: str = "", top_flags: int | None = None,
                    features=None) -> explain_pb2.ScoreColumnsRequest:
    """A ScoreColumnsRequest: row i of ``alpha`` (N, K) was computed for ``classes[i]`` (N,);
    ``top_flags`` flags per row and kind come back (None: the server's default, 1); ``features``
    (N, K), optional, row i the pooled features of input i (the feature tests)."""
    alpha = float32_rows(alpha, "alpha")
    classes = np.asarray(classes)
    if classes.shape != (alpha.shape[0],):
        raise ValueError(f"classes: expected {alpha.shape[0]} class ids (one per alpha row), got shape {classes.shape}")
    request = explain_pb2.ScoreColumnsRequest(model=model, model_version=model_version, classes=classes.tolist(),
                                              alpha=alpha)
    if features is not None:
        request.features.CopyFrom(float32_rows(features, "features", alpha.shape[0]))
    if top_flags is not None:
        request.top_flags = top_flags
    return request


@dataclass(frozen=True)
class ColumnScores:
    """Verdicts of N alpha vectors as arrays (ScoreColumns, ScoreStream); row i carries the
    same values as the ClassVerdict that Score returns for vector i. k = ``top_flags``.

    anomalous, class_calibration, pooled_distribution: (N,) bool; p_value, score, beta, beta_percentile, beta_z,
    surprise, missing, smallest_p_value: (N,) float64 (the last NaN from an older gateway); surprise_count, expectation_count: (N,) int32;
    tests: the T tests scored, the columns of test_p_values: (N, T) float64 and reasons: (N, T)
    bool (surprise, missing, low_beta, then feature_mahalanobis, feature_residual when the
    features were sent and the store has the feature tests); feature_mahalanobis,
    feature_residual: (N,) float64 those tests' statistics (NaN without them);
    surprising_filters, missing_filters: (N, k) int32, most extreme first, -1 padding;
    surprising_exceedance, missing_exceedance: (N, k) float32, 0 padding.
    """

    store_sha256: str
    target_fpr: float
    top_flags: int
    tests: tuple
    anomalous: np.ndarray
    p_value: np.ndarray
    score: np.ndarray
    beta: np.ndarray
    beta_percentile: np.ndarray
    beta_z: np.ndarray
    surprise: np.ndarray
    missing: np.ndarray
    surprise_count: np.ndarray
    expectation_count: np.ndarray
    test_p_values: np.ndarray
    reasons: np.ndarray
    class_calibration: np.ndarray
    pooled_distribution: np.ndarray
    smallest_p_value: np.ndarray
    feature_mahalanobis: np.ndarray
    feature_residual: np.ndarray
    surprising_filters: np.ndarray
    surprising_exceedance: np.ndarray
    missing_filters: np.ndarray
    missing_exceedance: np.ndarray

    @classmethod
    def from_response(cls, response: explain_pb2.ScoreColumnsResponse) -> "ColumnScores":
        rows, flags = len(response.p_value), response.top_flags
        tests = tuple(response.tests) or GRAD_AMAP_TESTS  # a gateway without `tests` scores these three

        def column(name: str, dtype, width: int | None = None) -> np.ndarray:
            values = np.asarray(getattr(response, name), dtype=dtype)
            return values if width is None else values.reshape(rows, width)

        return cls(
            store_sha256=response.store_sha256, target_fpr=response.target_fpr, top_flags=flags, tests=tests,
            anomalous=column("anomalous", bool), class_calibration=column("class_calibration", bool),
            pooled_distribution=column("pooled_distribution", bool),
            **{name: column(name, np.float64) for name in ("p_value", "score", "beta", "beta_percentile", "beta_z",
                                                           "surprise", "missing")},
            surprise_count=column("surprise_count", np.int32), expectation_count=column("expectation_count", np.int32),
            test_p_values=column("test_p_values", np.float64, len(tests)), reasons=column("reasons", bool, len(tests)),
            **{name: column(name, np.float64) if len(getattr(response, name)) else np.full(rows, np.nan)
               for name in ("feature_mahalanobis", "feature_residual", "smallest_p_value")},
            surprising_filters=column("surprising_filters", np.int32, flags),
            surprising_exceedance=column("surprising_exceedance", np.float32, flags),
            missing_filters=column("missing_filters", np.int32, flags),
            missing_exceedance=column("missing_exceedance", np.float32, flags),
        )

    @classmethod
    def concatenate(cls, parts: Sequence["ColumnScores"]) -> "ColumnScores":
        """The rows of ``parts`` (of one store, with the same ``top_flags`` and tests), in order."""
        first = parts[0]
        shared = ("store_sha256", "target_fpr", "top_flags", "tests")
        if any((p.store_sha256, p.top_flags) != (first.store_sha256, first.top_flags) for p in parts):
            raise ValueError("parts: scored with different stores or top_flags (a store reloaded mid-stream?)")
        if any(p.tests != first.tests for p in parts):
            raise ValueError(f"parts: scored with different tests ({sorted({p.tests for p in parts})}): send the "
                             "features with every message or with none")
        arrays = {name: np.concatenate([getattr(p, name) for p in parts])
                  for name in cls.__dataclass_fields__ if name not in shared}
        return cls(**{name: getattr(first, name) for name in shared}, **arrays)


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
              features=None, model_version: str = "", timeout: float | None = None) -> explain_pb2.AnomalyReport:
        """Anomaly verdict for Grad-AMap filter scores computed elsewhere (the ``Score`` RPC);
        ``features`` (K,), optional, the same input's pooled features (the feature tests)."""
        return self._call(self.stub.Score, score_request(alpha, model=model, predicted_class=predicted_class, label=label,
                                                         label_alpha=label_alpha, features=features,
                                                         model_version=model_version), timeout)

    def score_batch(self, requests: Sequence[explain_pb2.ScoreRequest], *,
                    timeout: float | None = None) -> list[explain_pb2.AnomalyReport]:
        """Verdicts for up to 4096 :func:`score_request` s in one ``ScoreBatch`` call."""
        return list(self._call(self.stub.ScoreBatch, explain_pb2.ScoreBatchRequest(requests=requests), timeout).reports)

    def score_columns(self, alpha, classes, *, model: str, model_version: str = "", top_flags: int | None = None,
                      features=None, timeout: float | None = None) -> ColumnScores:
        """Verdicts of the rows of ``alpha`` (N, K), row i against ``classes[i]``, in one
        ``ScoreColumns`` call (at most 8,388,608 values: 4096 rows of 2048); ``features`` (N, K),
        optional, the inputs' pooled features (the feature tests)."""
        request = columns_request(alpha, classes, model=model, model_version=model_version, top_flags=top_flags,
                                  features=features)
        return ColumnScores.from_response(self._call(self.stub.ScoreColumns, request, timeout))

    def score_stream(self, chunks: Iterable[tuple], *, model: str, model_version: str = "",
                     top_flags: int | None = None, timeout: float | None = None) -> Iterator[ColumnScores]:
        """One ``ScoreStream``: yields the verdicts of each ``(alpha (n, K), classes (n,))`` or
        ``(alpha, classes, features (n, K))`` of ``chunks`` in order, while later chunks are still
        being sent (``timeout``: the whole stream)."""
        requests = (columns_request(*chunk[:2], model=model, model_version=model_version, top_flags=top_flags,
                                    features=chunk[2] if len(chunk) > 2 else None) for chunk in chunks)
        try:
            for response in self.stub.ScoreStream(requests, timeout=timeout, metadata=self.metadata):
                yield ColumnScores.from_response(response)
        except grpc.RpcError as error:
            raise ExplainError(error.code(), error.details()) from None

    def score_all(self, alpha, classes, *, model: str, model_version: str = "", top_flags: int | None = None,
                  features=None, rows_per_message: int = 1024, timeout: float | None = None) -> ColumnScores:
        """Verdicts of any number of rows of ``alpha`` (N, K) (and of ``features`` (N, K), optional),
        sent ``rows_per_message`` at a time over one :meth:`score_stream`."""
        if rows_per_message < 1:
            raise ValueError(f"rows_per_message must be >= 1, got {rows_per_message}")
        if not len(alpha):
            raise ValueError("alpha: no rows to score")
        if features is not None and len(features) != len(alpha):
            raise ValueError(f"features: expected one row per alpha row ({len(alpha)}), got {len(features)}")
        columns = (alpha, np.asarray(classes)) + ((features,) if features is not None else ())
        chunks = (tuple(values[start:start + rows_per_message] for values in columns)
                  for start in range(0, len(alpha), rows_per_message))
        return ColumnScores.concatenate(list(self.score_stream(chunks, model=model, model_version=model_version,
                                                               top_flags=top_flags, timeout=timeout)))

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
