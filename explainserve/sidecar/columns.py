"""ScoreColumns and ScoreStream: packed alpha vectors (and pooled features) in, verdict arrays out.

A ScoreBatch answer builds one ClassVerdict per input, with up to 64 FilterFlag messages and
their exemplars, and its request carries every vector as a repeated field: at 256 vectors of
2048 filters that building took about 30 times as long as the scoring (bench/sidecar_timing.py).
The columnar form sends the vectors as one float32 tensor, read as one numpy array, and answers
with one array per field (the double, float and bool ones written as packed wire bytes), so no
per-row object is built; moving a call's 2 MB through gRPC then costs about as much as scoring it.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from explainserve._generated import explain_pb2
from explainserve.anomaly import BatchScores, Scorer
from explainserve.anomaly.conformal import TESTS
from explainserve.anomaly.feature_tests import FEATURE_TESTS
from explainserve.anomaly.top_flags import top_flags
from explainserve.inputs import InputTooLarge

from .scoring import MAX_BATCH, MAX_FLAGS

# Values per message: as many as a full ScoreBatch of ResNet-50 vectors (4096 x 2048, 32 MiB),
# which bounds the scorer's (N, F) temporaries to a few hundred MB.
MAX_COLUMN_VALUES = MAX_BATCH * 2048
DEFAULT_TOP_FLAGS = 1


def column_values(request: explain_pb2.ScoreColumnsRequest) -> int:
    """How many values the shapes of ``request.alpha`` and ``request.features`` claim (unchecked:
    for choosing a thread). Each read of ``data`` copies the bytes, so the length is not taken from there."""
    return sum(math.prod(tensor.shape) if len(tensor.shape) else 0 for tensor in (request.alpha, request.features))


def float32_rows(tensor: explain_pb2.Tensor, name: str, columns: int, rows: int | None = None) -> np.ndarray:
    """The (N, ``columns``) float32 array of the Tensor field ``name``: a read-only view of one copy
    of its bytes. ``rows``, when given, is the N it must have (one row per alpha row).

    Raises
    ------
    InputTooLarge
        More than MAX_COLUMN_VALUES values.
    ValueError
        A dtype, shape or byte count that does not fit, named first (``features.shape: ...``).
    """
    if tensor.dtype != explain_pb2.Tensor.FLOAT32:
        raise ValueError(f"{name}.dtype: must be FLOAT32, got {explain_pb2.Tensor.DType.Name(tensor.dtype)}")
    shape = tuple(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != columns or rows not in (None, shape[0]):
        wanted = "N >= 1" if rows is None else f"N = {rows}, one row per alpha row"
        raise ValueError(f"{name}.shape: must be (N, {columns}) with {wanted} (one row of {columns} values per "
                         f"input), got {list(shape)}")
    if shape[0] * shape[1] > MAX_COLUMN_VALUES:
        raise InputTooLarge(f"{name}: at most {MAX_COLUMN_VALUES} values ({MAX_COLUMN_VALUES // columns} rows) per "
                            f"message, got {shape[0]} x {shape[1]}; send more messages (ScoreStream)")
    data = tensor.data  # a copy per read: read it once
    if len(data) != shape[0] * shape[1] * 4:
        raise ValueError(f"{name}.data: {shape[0]} x {shape[1]} float32 values are {shape[0] * shape[1] * 4} bytes, "
                         f"got {len(data)}")
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def parse_columns(request: explain_pb2.ScoreColumnsRequest,
                  num_filters: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """The (N, F) float32 alpha, the (N,) int64 classes, the flags per row and the (N, F) float32
    features (None when the request has none) of a request to a store of ``num_filters`` filters;
    alpha and features are read-only views of one copy of the request's bytes.

    Raises
    ------
    InputTooLarge
        More than MAX_COLUMN_VALUES values in alpha or features.
    ValueError
        A field that does not fit, named first (``alpha.shape: ...``).
    """
    alpha = float32_rows(request.alpha, "alpha", num_filters)
    if len(request.classes) != len(alpha):
        raise ValueError(f"classes: one class id per alpha row expected ({len(alpha)}), got {len(request.classes)}")
    flags = request.top_flags if request.HasField("top_flags") else DEFAULT_TOP_FLAGS
    if not 0 <= flags <= MAX_FLAGS:
        raise ValueError(f"top_flags: must be in [0, {MAX_FLAGS}], got {flags}")
    features = (float32_rows(request.features, "features", num_filters, len(alpha))
                if request.HasField("features") else None)
    return alpha, np.asarray(request.classes, dtype=np.int64), flags, features


def score_columns(scorer: Scorer, request: explain_pb2.ScoreColumnsRequest) -> explain_pb2.ScoreColumnsResponse:
    """Score every row of ``request`` against its class with ``scorer`` (with the feature tests
    when the request carries features and the store has them).

    Raises
    ------
    InputTooLarge, ValueError
        Named after the request field (``classes: unknown class 9: ...``).
    """
    alpha, classes, flags, features = parse_columns(request, scorer.store.meta.num_filters)
    try:
        scores = scorer.score(alpha, classes, features=features)
    except ValueError as error:
        raise ValueError(f"{refused_field(scorer, classes, error)}: {error}") from None
    return columns_response(scores, flags)


def refused_field(scorer: Scorer, classes: np.ndarray, error: ValueError) -> str:
    """The request field the scorer's ``error`` is about: ``features`` when it names them, else
    ``classes`` when a class cannot be scored, else ``alpha``."""
    if str(error).startswith("features"):
        return "features"
    reference = scorer.reference
    known = ((classes >= 0) & (classes < reference.num_classes)).all() and reference.scorable[classes].all()
    return "alpha" if known else "classes"


def columns_response(scores: BatchScores, flags: int) -> explain_pb2.ScoreColumnsResponse:
    """The ScoreColumnsResponse of ``scores`` with ``flags`` flags per row and kind; the (N, T)
    test arrays cover ``scores.test_names``, which the response names."""
    top = top_flags(scores, flags)
    response = explain_pb2.ScoreColumnsResponse(
        store_sha256=scores.scorer.store.sha256, target_fpr=scores.scorer.target_fpr, top_flags=flags,
        surprise_count=scores.surprise_count.tolist(), expectation_count=scores.expectation_count.tolist(),
        surprising_filters=top.surprising_filters.ravel().tolist(), missing_filters=top.missing_filters.ravel().tolist(),
        tests=scores.test_names,
    )
    statistics = scores.statistics
    merge_packed(response, anomalous=scores.anomalous, p_value=scores.p_value, score=scores.score, beta=scores.beta,
                 beta_percentile=scores.beta_percentile, beta_z=scores.beta_z, surprise=statistics[:, 0],
                 missing=statistics[:, 1], test_p_values=scores.p_values[:, :-1], reasons=scores.tests,
                 class_calibration=scores.from_class, pooled_distribution=scores.scorer.reference.pooled[scores.classes],
                 smallest_p_value=scores.scorer.smallest_p_value[scores.classes],
                 surprising_exceedance=top.surprising_exceedance, missing_exceedance=top.missing_exceedance)
    if scores.test_names != TESTS:  # scored with the feature tests: their statistics too
        merge_packed(response, **{test: statistics[:, scores.test_names.index(test)] for test in FEATURE_TESTS})
    return response


# The little-endian numpy type of each fixed-width packed field type: its wire bytes are the array's bytes.
PACKED_DTYPES = {FieldDescriptor.TYPE_DOUBLE: "<f8", FieldDescriptor.TYPE_FLOAT: "<f4", FieldDescriptor.TYPE_BOOL: "u1"}


def merge_packed(message, **arrays: np.ndarray) -> None:
    """Append each array (row-major) to ``message``'s packed repeated double, float or bool field
    of the same name, as wire bytes parsed in one ``MergeFromString``: a list is converted to
    the field value by value (about 70 ns a value), an array's bytes are copied at once."""
    wire = bytearray()
    for name, values in arrays.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        data = np.ascontiguousarray(values, dtype=PACKED_DTYPES[field.type]).tobytes()
        wire += varint(field.number << 3 | 2) + varint(len(data)) + data  # wire type 2: length-delimited
    message.MergeFromString(bytes(wire))


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative ``value``."""
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        encoded.append(low | (0x80 if value else 0))
        if not value:
            return bytes(encoded)
