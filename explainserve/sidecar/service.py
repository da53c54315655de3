"""The ``explainserve.v1.Explainer`` servicer: validate, forward to TorchServe, type the answer."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from explainserve import inputs
from explainserve.methods import SUPPRESSION_STEPS
from explainserve._generated import explain_pb2, explain_pb2_grpc, handler_pb2, inference_pb2, inference_pb2_grpc
from explainserve import wire
from explainserve.wire import DEADLINE_KEY, HANDLER_REQUEST_KEY, REGION_REQUEST_KEY, deadline_entry

from .scoring import MAX_BATCH, AnomalyScoring, ScoringUnavailable
from .catalog import ModelCatalog, UnknownModel, is_unknown_model
from .metrics import GatewayMetrics, method_label
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

# Score / ScoreBatch with at most this many filter scores run on the event loop, larger ones in a thread.
INLINE_SCORES = 1 << 16

# Seconds of the client's deadline kept for answering after a surprise-region call (the answer
# with its maps still has to be serialised and sent on a possibly busy machine).
REGION_MARGIN = 0.25

# TorchServe fails the batch of a worker that died with RESOURCE_EXHAUSTED and this message.
WORKER_DIED = "Worker died"


class RpcFailure(Exception):
    """Ends an RPC with a status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def region_filter(verdict: explain_pb2.ClassVerdict) -> explain_pb2.FilterFlag | None:
    """The filter whose surprise region is shown: the most surprising one with a non-zero
    Grad-AMap score. A filter whose score is exactly 0 has zero activation (or zero gradient)
    everywhere, so no pixel acts through it and its region map would be blank; it can still
    be surprising when its training scores are all negative."""
    return next((flag for flag in verdict.surprising_filters if flag.alpha != 0), None)


class ExplainerService(explain_pb2_grpc.ExplainerServicer):
    """Serves Explain (forwarded to TorchServe) and Score / ScoreBatch (in-process).

    Parameters
    ----------
    default_timeout : float
        Seconds allowed for the TorchServe call when the client sets no deadline.
    explain_anomaly : bool
        Find the surprise region of ANOMALOUS verdicts when a request leaves
        ``explain_anomaly`` unset.
    """

    def __init__(self, inference_channel: grpc.aio.Channel, catalog: ModelCatalog, metrics: GatewayMetrics,
                 anomaly: AnomalyScoring, *, default_timeout: float = 120.0, explain_anomaly: bool = False):
        self.torchserve = inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel)
        self.catalog = catalog
        self.metrics = metrics
        self.anomaly = anomaly
        self.default_timeout = default_timeout
        self.explain_anomaly = explain_anomaly

    async def Explain(self, request, context):
        label = method_label(request.methods)
        return await self._measured("Explain", label, self._explain(request, context, label), context)

    async def Score(self, request, context):
        async def score_one():
            (report,) = await self._score([request], batch=False)
            return report
        return await self._measured("Score", "score", score_one(), context)

    async def ScoreBatch(self, request, context):
        async def score_all():
            return explain_pb2.ScoreBatchResponse(reports=await self._score(request.requests, batch=True))
        return await self._measured("ScoreBatch", "score", score_all(), context)

    # -- plumbing --------------------------------------------------------------------
    async def _measured(self, rpc: str, label: str, work, context):
        """Run one RPC's work, count and time it, and turn RpcFailure into its status."""
        started = time.perf_counter()
        self.metrics.inflight.labels(rpc).inc()
        code, failed = grpc.StatusCode.OK, None
        try:
            return await work
        except RpcFailure as failure:
            code, failed = failure.code, failure
        except asyncio.CancelledError:  # the client went away or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001 - answered as INTERNAL, logged with its traceback
            log.exception("%s failed", rpc)
            failed = RpcFailure(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
            code = failed.code
        finally:
            self.metrics.inflight.labels(rpc).dec()
            self.metrics.duration.labels(rpc, label).observe(time.perf_counter() - started)
            self.metrics.requests.labels(rpc, label, code.name).inc()
        await context.abort(failed.code, failed.message)

    async def _explain(self, request, context, label: str) -> explain_pb2.ExplainResponse:
        started = time.perf_counter()
        metadata = await self._metadata(request.model, request.model_version)
        try:
            await asyncio.to_thread(check_request, request, metadata)
        except inputs.InputTooLarge as error:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except ValueError as error:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

        forwarded = inference_pb2.PredictionsRequest(
            model_name=request.model, model_version=request.model_version,
            input={HANDLER_REQUEST_KEY: request.SerializeToString()},
        )
        remaining = context.time_remaining()
        timeout = self.default_timeout if remaining is None else max(remaining, 0.0)
        forwarded.input[DEADLINE_KEY] = deadline_entry(timeout)
        forwarded_at = time.perf_counter()
        try:
            answer = await self.torchserve.Predictions(forwarded, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._torchserve_failure(error, request.model) from None
        torchserve_seconds = time.perf_counter() - forwarded_at
        self.metrics.torchserve_duration.labels(label).observe(torchserve_seconds)

        result = handler_pb2.HandlerResponse.FromString(answer.prediction)
        if result.WhichOneof("result") == "error":
            raise RpcFailure(HANDLER_CODES.get(result.error.code, grpc.StatusCode.INTERNAL), result.error.message)
        response = result.response
        response.anomaly.CopyFrom(self.anomaly.score(
            request.model, result.alpha, response.target_class,
            request.label if request.HasField("label") else None, result.label_alpha or None,
            version=response.model_version))
        if request.explain_anomaly if request.HasField("explain_anomaly") else self.explain_anomaly:
            await self._surprise_regions(request, response.anomaly, context)
        timings = response.timings
        timings.torchserve_queue = max(torchserve_seconds - timings.handler, 0.0)
        timings.total = time.perf_counter() - started
        timings.gateway = timings.total - torchserve_seconds
        return response

    async def _surprise_regions(self, request, report: explain_pb2.AnomalyReport, context) -> None:
        """Thesis 6.3.2 for each ANOMALOUS verdict of ``report``: the region that triggered its most
        surprising filter, from one more handler call (a RegionRequest), with that filter's
        exemplars. A failure is written into the verdicts, never raised."""
        anomalous = [v for v in (report.predicted, report.label) if v.verdict == explain_pb2.ClassVerdict.ANOMALOUS]
        asked, flags = [], []
        for verdict in anomalous:
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
        remaining = context.time_remaining()
        timeout = self.default_timeout if remaining is None else remaining - REGION_MARGIN
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

    async def _metadata(self, model: str, version: str) -> dict:
        if not model:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "model: the request names no model")
        try:
            return await self.catalog.metadata(model, version)
        except UnknownModel:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model: unknown model {model!r}" + (f" version {version!r}" if version else "")) from None
        except grpc.aio.AioRpcError as error:
            raise self._torchserve_failure(error, model) from None

    @staticmethod
    def _torchserve_failure(error: grpc.aio.AioRpcError, model: str) -> RpcFailure:
        if is_unknown_model(error):
            return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"model: unknown model {model!r}")
        code = TORCHSERVE_CODES.get(error.code(), grpc.StatusCode.INTERNAL)
        if WORKER_DIED in (error.details() or ""):
            code = grpc.StatusCode.UNAVAILABLE  # a retryable outage, not an oversize request
        return RpcFailure(code, f"TorchServe: {error.code().name}: {error.details()}")

    async def _score(self, requests, *, batch: bool) -> list:
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
                    await self._metadata(request.model, request.model_version)  # known to TorchServe?
                except RpcFailure as failure:
                    raise RpcFailure(failure.code, where + failure.message) from None
        try:
            if sum(len(r.alpha) + len(r.label_alpha) for r in requests) <= INLINE_SCORES:  # microseconds: inline
                return self.anomaly.score_requests(requests, batch=batch)
            return await asyncio.to_thread(self.anomaly.score_requests, requests, batch=batch)
        except ScoringUnavailable as error:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, error.message) from None
        except ValueError as error:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
