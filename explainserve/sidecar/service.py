"""The ``explainserve.v1.Explainer`` servicer: a thin gRPC adapter over :class:`ExplainPipeline`.

The servicer counts, times and answers calls; the work (validate, forward to TorchServe, score,
region) is the pipeline's, which another servicer can reuse with the same stub and catalog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import grpc

from explainserve.methods import METHODS
from explainserve._generated import explain_pb2, explain_pb2_grpc, inference_pb2_grpc

from .catalog import ModelCatalog
from .metrics import GatewayMetrics, method_label
from .pipeline import WORKER_DIED, ExplainPipeline, RpcFailure, region_filter  # noqa: F401 (part of this API)
from .scoring import AnomalyScoring

log = logging.getLogger(__name__)


class ExplainerService(explain_pb2_grpc.ExplainerServicer):
    """Serves Explain (forwarded to TorchServe) and Score, ScoreBatch, ScoreColumns and
    ScoreStream (in-process).

    Parameters
    ----------
    default_timeout : float
        Seconds allowed for the TorchServe call when the client sets no deadline.
    explain_anomaly : bool
        Find the surprise region of ANOMALOUS verdicts when a request leaves
        ``explain_anomaly`` unset.

    Attributes
    ----------
    pipeline : ExplainPipeline
        The work behind every RPC, on TorchServe's inference stub.
    catalog : ModelCatalog
        The served models' metadata (the pipeline's too).
    """

    def __init__(self, inference_channel: grpc.aio.Channel, catalog: ModelCatalog, metrics: GatewayMetrics,
                 anomaly: AnomalyScoring, *, default_timeout: float = 120.0, explain_anomaly: bool = False):
        self.metrics = metrics
        self.catalog = catalog
        self.pipeline = ExplainPipeline(
            inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel), catalog, anomaly,
            observe_torchserve=lambda label, seconds: metrics.torchserve_duration.labels(label).observe(seconds),
            default_timeout=default_timeout, explain_anomaly=explain_anomaly)

    async def Explain(self, request, context):
        methods = list(request.methods)
        valid = set(methods) <= set(METHODS) and len(set(methods)) == len(methods)
        label = method_label(methods) if valid else "invalid"  # keeps the label set bounded
        return await self._measured("Explain", label, self.pipeline.explain(request, context.time_remaining, label), context)

    async def Score(self, request, context):
        async def score_one():
            (report,) = await self.pipeline.score_requests([request], batch=False)
            return report
        return await self._measured("Score", "score", score_one(), context)

    async def ScoreBatch(self, request, context):
        async def score_all():
            return explain_pb2.ScoreBatchResponse(reports=await self.pipeline.score_requests(request.requests, batch=True))
        return await self._measured("ScoreBatch", "score", score_all(), context)

    async def ScoreColumns(self, request, context):
        return await self._measured("ScoreColumns", "score", self.pipeline.score_columns(request), context)

    async def ScoreStream(self, request_iterator, context):
        # One answer per message, in order; a refused message ends the stream with its status.
        async with self._accounted("ScoreStream", "score", context):
            index = 0
            async for request in request_iterator:
                yield await self.pipeline.score_columns(request, where=f"messages[{index}].")
                index += 1

    # -- plumbing --------------------------------------------------------------------
    async def _measured(self, rpc: str, label: str, work, context):
        """Run one unary RPC's work under :meth:`_accounted`."""
        async with self._accounted(rpc, label, context):
            return await work

    @asynccontextmanager
    async def _accounted(self, rpc: str, label: str, context):
        """Count and time the RPC run inside, and turn RpcFailure into its status."""
        started = time.perf_counter()
        self.metrics.inflight.labels(rpc).inc()
        code, failed = grpc.StatusCode.OK, None
        try:
            yield
        except RpcFailure as failure:
            code, failed = failure.code, failure
        except grpc.aio.AbortError:  # refused mid-stream by an interceptor, which counted it
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or its deadline passed
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
        if failed is not None:
            await context.abort(failed.code, failed.message)
