"""The gateway's work without the gRPC server: validate -> forward -> score -> region.

:class:`ExplainPipeline` takes a TorchServe inference stub (anything with an async
``Predictions(PredictionsRequest, timeout=...)``), a model catalog (async ``metadata(model,
version)``) and the anomaly scoring, and turns an ``ExplainRequest`` into an
``ExplainResponse``, or raises :class:`RpcFailure` with the status to answer. A servicer only
adapts it to its transport (``service.ExplainerService`` for explainserve.v1); the unit tests
drive it with a fake stub.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

import grpc

from explainserve import wire
from explainserve._generated import explain_pb2, handler_pb2, inference_pb2
from explainserve.anomaly.scorer import region_flag
from explainserve.inputs import InputTooLarge
from explainserve.methods import SUPPRESSION_STEPS
from explainserve.wire import DEADLINE_KEY, HANDLER_REQUEST_KEY, REGION_REQUEST_KEY, deadline_entry

from .catalog import UnknownModel, is_unknown_model
from .columns import column_values, score_columns
from .scoring import MAX_BATCH, AnomalyScoring, ScoringUnavailable
from .validation import check_request

log = logging.getLogger(__name__)
# A handler's HandlerError.code (google.rpc.Code number) -> the status we answer with.
HANDLER_CODES = {code: getattr(grpc.StatusCode, name) for code, name in wire.CODE_NAMES.items() if code != wire.INTERNAL}
# TorchServe's own failures -> ours; anything else is INTERNAL.
TORCHSERVE_CODES = {
    grpc.StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED: grpc.StatusCode.CANCELLED,
    # TorchServe refused the gateway's key (token authorisation): no --token-file, or a stale key.
    grpc.StatusCode.PERMISSION_DENIED: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: grpc.StatusCode.UNAVAILABLE,
}
# TorchServe fails the batch of a worker that died with RESOURCE_EXHAUSTED and this message.
WORKER_DIED = "Worker died"
# Calls with at most this many filter scores run on the event loop, larger ones in a thread
# (off_loop_if_large). Score / ScoreBatch build a result message per row (about 150 us a row of
# 2048): 32 such rows take one GIL switch interval (5 ms).
INLINE_SCORES = 1 << 16
# ScoreColumns scores about 8 us a row of 2048: 256 rows take about 2 ms on the loop. In a thread
# the scoring still holds the GIL, so the loop gains little: with a task on the loop every 0.5 ms,
# a call of 256 rows took 4.5 ms instead of 2.8 ms and the loop's longest stall went from 2.8 to
# 2.6 ms (in-process, medians of 40, loaded machine).
INLINE_COLUMN_SCORES = 1 << 19
# Seconds of the client's deadline kept for answering after a surprise-region call (the answer
# with its maps still has to be serialised and sent on a possibly busy machine).
REGION_MARGIN = 0.25


class RpcFailure(Exception):
    """Ends an RPC with a status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class PredictionsStub(Protocol):
    """What the pipeline needs of TorchServe: ``InferenceAPIsServiceStub`` has it."""

    async def Predictions(self, request: inference_pb2.PredictionsRequest, *,
                          timeout: float | None = None) -> inference_pb2.PredictionResponse: ...


class MetadataSource(Protocol):
    """What the pipeline needs of the catalog: ``ModelCatalog`` has it."""

    async def metadata(self, model: str, version: str = "") -> dict: ...


def region_filter(verdict: explain_pb2.ClassVerdict) -> explain_pb2.FilterFlag | None:
    """The filter whose surprise region is shown (:func:`~explainserve.anomaly.scorer.region_flag`)."""
    return region_flag(verdict.surprising_filters)


class ExplainPipeline:
    """Explain and Score, from a request message to a response message or an RpcFailure.

    Parameters
    ----------
    torchserve : PredictionsStub
        TorchServe's inference API.
    catalog : MetadataSource
        The handlers' describe() per (model, version).
    anomaly : AnomalyScoring
        The distribution stores in use.
    observe_torchserve : callable(label, seconds), optional
        Called with the method label and the seconds of each Explain's TorchServe call.
    default_timeout : float
        Seconds allowed for a TorchServe call when the caller sets no deadline.
    explain_anomaly : bool
        Find the surprise region of ANOMALOUS verdicts when a request leaves
        ``explain_anomaly`` unset.
    """

    def __init__(self, torchserve: PredictionsStub, catalog: MetadataSource, anomaly: AnomalyScoring, *,
                 observe_torchserve: Callable[[str, float], None] | None = None, default_timeout: float = 120.0,
                 explain_anomaly: bool = False):
        self.torchserve = torchserve
        self.catalog = catalog
        self.anomaly = anomaly
        self.observe_torchserve = observe_torchserve or (lambda label, seconds: None)
        self.default_timeout = default_timeout
        self.explain_anomaly = explain_anomaly

    async def explain(self, request: explain_pb2.ExplainRequest, time_remaining: Callable[[], float | None] = lambda: None,
                      label: str = "") -> explain_pb2.ExplainResponse:
        """The whole Explain call: validate, forward, score, and the surprise region if asked.

        ``time_remaining()`` gives the caller's seconds left (None: no deadline), as
        ``grpc.aio.ServicerContext.time_remaining`` does; ``label`` names the methods for metrics.
        """
        started = time.perf_counter()
        await self.validate(request)
        result, torchserve_seconds = await self.forward(request, self.timeout(time_remaining()), label)
        response = result.response
        response.anomaly.CopyFrom(self.score(request, result))
        if request.explain_anomaly if request.HasField("explain_anomaly") else self.explain_anomaly:
            remaining = time_remaining()
            await self.region(request, response.anomaly,
                              self.default_timeout if remaining is None else remaining - REGION_MARGIN)
        timings = response.timings
        timings.torchserve_queue = max(torchserve_seconds - timings.handler, 0.0)
        timings.total = time.perf_counter() - started
        timings.gateway = timings.total - torchserve_seconds
        return response

    def timeout(self, remaining: float | None) -> float:
        """Seconds for a TorchServe call: the caller's remaining time, or the default."""
        return self.default_timeout if remaining is None else max(remaining, 0.0)

    # -- the steps -------------------------------------------------------------------
    async def validate(self, request: explain_pb2.ExplainRequest) -> dict:
        """The model's describe() once the request fits it; RpcFailure INVALID_ARGUMENT or
        RESOURCE_EXHAUSTED naming the field otherwise."""
        metadata = await self.metadata(request.model, request.model_version)
        try:
            if request.WhichOneof("input") == "clip":  # a video file's container is read: off the loop
                await asyncio.to_thread(check_request, request, metadata)
            else:  # an image's header: 25-32 us of CPU, against 96-110 us through a thread
                check_request(request, metadata)
        except ValueError as error:
            raise failure_of(error) from None
        return metadata

    async def forward(self, request: explain_pb2.ExplainRequest, timeout: float,
                      label: str = "") -> tuple[handler_pb2.HandlerResponse, float]:
        """The handler's answer to ``request`` and the seconds TorchServe took (observed under
        ``label``, answered or refused); its in-band error, or TorchServe's, as RpcFailure."""
        forwarded = inference_pb2.PredictionsRequest(
            model_name=request.model, model_version=request.model_version,
            input={HANDLER_REQUEST_KEY: request.SerializeToString(), DEADLINE_KEY: deadline_entry(timeout)},
        )
        forwarded_at = time.perf_counter()
        try:
            answer = await self.torchserve.Predictions(forwarded, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise torchserve_failure(error, request.model) from None
        seconds = time.perf_counter() - forwarded_at
        self.observe_torchserve(label, seconds)
        result = handler_pb2.HandlerResponse.FromString(answer.prediction)
        if result.WhichOneof("result") == "error":
            raise RpcFailure(HANDLER_CODES.get(result.error.code, grpc.StatusCode.INTERNAL), result.error.message)
        return result, seconds

    def score(self, request: explain_pb2.ExplainRequest, result: handler_pb2.HandlerResponse) -> explain_pb2.AnomalyReport:
        """The anomaly report of the handler's alpha (and label alpha) against the model's store,
        with the input's pooled features (the feature tests) when the handler sent them."""
        return self.anomaly.score(
            request.model, result.alpha, result.response.target_class,
            request.label if request.HasField("label") else None, result.label_alpha or None,
            features=result.features or None, version=result.response.model_version)

    async def region(self, request: explain_pb2.ExplainRequest, report: explain_pb2.AnomalyReport, timeout: float) -> None:
        """Thesis 6.3.2 for each ANOMALOUS verdict of ``report``: the region that triggered its most
        surprising filter, from one more handler call (a RegionRequest) given ``timeout`` seconds,
        with that filter's exemplars. A failure is written into the verdicts, never raised."""
        asked, flags = self._region_filters(report)
        if not asked:
            return
        # With a label, the counterfactual too: does deleting the region give the label back?
        region_request = handler_pb2.RegionRequest(filters=[
            handler_pb2.FilterTarget(filter=flag.filter, class_index=verdict.class_index)
            for verdict, flag in zip(asked, flags)], suppression_steps=SUPPRESSION_STEPS if request.HasField("label") else 0)
        forwarded = inference_pb2.PredictionsRequest(
            model_name=request.model, model_version=request.model_version,
            input={HANDLER_REQUEST_KEY: request.SerializeToString(), REGION_REQUEST_KEY: region_request.SerializeToString()},
        )
        try:
            if timeout <= 0:
                raise ValueError("no time left before the request's deadline")
            forwarded.input[DEADLINE_KEY] = deadline_entry(timeout)
            answer = await self.torchserve.Predictions(forwarded, timeout=timeout)
            result = handler_pb2.HandlerResponse.FromString(answer.prediction)
            if result.WhichOneof("result") == "error":
                raise ValueError(f"the handler answered: {result.error.message}")
            if len(result.regions) != len(asked):
                raise ValueError(f"the handler answered {len(result.regions)} regions for {len(asked)} filters")
        except (grpc.aio.AioRpcError, ValueError) as error:
            message = f"TorchServe: {error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
            log.warning("surprise region for model %r unavailable: %s", request.model, message)
            for verdict in asked:
                verdict.surprise_region_unavailable = f"region call failed: {message}"
            return
        for verdict, flag, region in zip(asked, flags, result.regions):
            verdict.surprise_region.CopyFrom(region)
            verdict.surprise_region.exemplars.extend(flag.exemplars)
            if region.HasField("suppression"):
                suppression = verdict.surprise_region.suppression
                suppression.label_restored = suppression.prediction_changed and suppression.predicted_after == request.label

    @staticmethod
    def _region_filters(report: explain_pb2.AnomalyReport) -> tuple[list, list]:
        """The ANOMALOUS verdicts that have a region to find, and their filters; the others say why not."""
        asked, flags = [], []
        for verdict in (report.predicted, report.label):
            if verdict.verdict != explain_pb2.ClassVerdict.ANOMALOUS:
                continue
            flag = region_filter(verdict)
            if flag is not None:
                asked.append(verdict)
                flags.append(flag)
            elif verdict.surprising_filters:
                verdict.surprise_region_unavailable = (
                    "the surprising filters are silent on this input (zero activation or gradient everywhere): "
                    "no region drives them")
            else:
                verdict.surprise_region_unavailable = "no surprising filter: the verdict rests on the other tests"
        return asked, flags

    # -- Score / ScoreBatch ----------------------------------------------------------
    async def score_requests(self, requests, *, batch: bool) -> list[explain_pb2.AnomalyReport]:
        """AnomalyReports for ScoreRequests: INVALID_ARGUMENT for a bad request or an unknown
        model, UNAVAILABLE for a model without a usable store."""
        if len(requests) > MAX_BATCH:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"requests: at most {MAX_BATCH} per ScoreBatch call, got {len(requests)}")
        for index, request in enumerate(requests):
            where = f"requests[{index}]." if batch else ""
            if not request.model:
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{where}model: the request names no model")
            if not self.anomaly.has_store(request.model):
                try:
                    await self.metadata(request.model, request.model_version)  # known to TorchServe?
                except RpcFailure as failure:
                    raise RpcFailure(failure.code, where + failure.message) from None
        try:
            return await off_loop_if_large(sum(len(r.alpha) + len(r.label_alpha) + len(r.features) for r in requests),
                                           INLINE_SCORES,
                                           self.anomaly.score_requests, requests, batch=batch)
        except ScoringUnavailable as error:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, error.message) from None
        except ValueError as error:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    async def score_columns(self, request: explain_pb2.ScoreColumnsRequest,
                            where: str = "") -> explain_pb2.ScoreColumnsResponse:
        """The ScoreColumnsResponse of one request (``where`` prefixes the field names in a
        refusal): INVALID_ARGUMENT for a bad request or an unknown model, RESOURCE_EXHAUSTED for
        one over the size limit, UNAVAILABLE for a model without a usable store."""
        try:
            if not self.anomaly.has_store(request.model):
                await self.metadata(request.model, request.model_version)  # known to TorchServe?
            scorer = self.anomaly.scorer_for(request.model, request.model_version)
            return await off_loop_if_large(column_values(request), INLINE_COLUMN_SCORES, score_columns, scorer, request)
        except RpcFailure as failure:
            raise RpcFailure(failure.code, where + failure.message) from None
        except ScoringUnavailable as error:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{where}model: {error.message}") from None
        except ValueError as error:
            failure = failure_of(error)
            raise RpcFailure(failure.code, where + failure.message) from None

    # -- the model -------------------------------------------------------------------
    async def metadata(self, model: str, version: str) -> dict:
        """The handler's describe() of a served model; RpcFailure if the model is not served."""
        if not model:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "model: the request names no model")
        try:
            return await self.catalog.metadata(model, version)
        except UnknownModel:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model: unknown model {model!r}" + (f" version {version!r}" if version else "")) from None
        except grpc.aio.AioRpcError as error:
            raise torchserve_failure(error, model) from None


async def off_loop_if_large(values: int, inline: int, score: Callable, *args, **kwargs):
    """``score(*args, **kwargs)``: on the event loop for at most ``inline`` filter scores (a few
    milliseconds of work), in a thread for more, so a large batch does not stall other calls."""
    if values <= inline:
        return score(*args, **kwargs)
    return await asyncio.to_thread(score, *args, **kwargs)


def failure_of(error: ValueError) -> RpcFailure:
    """A refused request: RESOURCE_EXHAUSTED for an input over the limits, else INVALID_ARGUMENT."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, InputTooLarge) else grpc.StatusCode.INVALID_ARGUMENT
    return RpcFailure(code, str(error))


def torchserve_failure(error: grpc.aio.AioRpcError, model: str) -> RpcFailure:
    """TorchServe's failure as ours: an unknown model is the caller's error, a dead worker an outage."""
    if is_unknown_model(error):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"model: unknown model {model!r}")
    code = TORCHSERVE_CODES.get(error.code(), grpc.StatusCode.INTERNAL)
    if WORKER_DIED in (error.details() or ""):
        code = grpc.StatusCode.UNAVAILABLE  # a retryable outage, not an oversize request
    return RpcFailure(code, f"TorchServe: {error.code().name}: {error.details()}")
