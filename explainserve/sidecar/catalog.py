"""What the gateway knows about TorchServe: is it up, which models, their metadata, workers.

Model metadata (kind, input size, classes, accepted ranges) comes from the handler's
customised describe (TorchServe's DescribeModel with ``customized=true``) and is cached for
``metadata_ttl`` seconds, so a re-registered model or a new default version is seen.
A background task pings TorchServe and polls describe-model for worker status.

``up`` (the gateway's readiness) is TorchServe answering its ping Healthy once every model it
serves has had a READY worker: TorchServe pings Healthy while its first workers still load
(seconds, minutes from a cold disk), and a pod reported ready then would take calls that wait
in TorchServe's queue. A worker restarted later does not make the gateway unready again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
from google.protobuf import empty_pb2

from explainserve._generated import inference_pb2_grpc, management_pb2, management_pb2_grpc

from .keys import is_refused
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """TorchServe does not serve this model (version)."""


def is_unknown_model(error: grpc.aio.AioRpcError) -> bool:
    """TorchServe 0.12 answers a customised describe of an unknown model with INTERNAL
    "Model not found", other calls with NOT_FOUND."""
    return error.code() == grpc.StatusCode.NOT_FOUND or "Model not found" in (error.details() or "")


class ModelCatalog:
    """Cached model metadata and TorchServe health, refreshed by :meth:`poll_forever`."""

    def __init__(self, inference_channel: grpc.aio.Channel, management_channel: grpc.aio.Channel,
                 metrics: GatewayMetrics, *, poll_interval: float = 2.0, call_timeout: float = 5.0,
                 metadata_ttl: float = 30.0):
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel)
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(management_channel)
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.call_timeout = call_timeout
        self.metadata_ttl = metadata_ttl
        self.up = False
        self.healthy = False  # TorchServe's last ping answered Healthy
        self.models_loaded = False  # every model has had a READY worker (stays True once set)
        self._refusal_logged = False
        # (model, version) -> (time.monotonic() when described, describe())
        self._metadata: dict[tuple[str, str], tuple[float, dict]] = {}
        self._on_health_change = []
        self._on_model = []

    def on_model(self, callback) -> None:
        """Call ``callback(model, version, described)`` when the default version TorchServe serves
        is learnt (``described``: the handler's describe() of it)."""
        self._on_model.append(callback)

    def on_health_change(self, callback) -> None:
        """Call ``callback(up: bool)`` whenever ``up`` changes."""
        self._on_health_change.append(callback)

    async def metadata(self, model: str, version: str = "") -> dict:
        """The handler's describe() for a model, described again once ``metadata_ttl`` old;
        raises UnknownModel, or grpc.aio.AioRpcError when TorchServe fails and nothing is cached
        (a failed refresh keeps the last answer)."""
        key = (model, version)
        cached = self._metadata.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.metadata_ttl:
            return cached[1]
        try:
            return await self._describe(model, version)
        except UnknownModel:
            self._metadata.pop(key, None)  # unregistered
            raise
        except grpc.aio.AioRpcError as error:
            if cached is None:
                raise
            log.warning("describe of model %r failed (%s: %s): its cached metadata stays in use",
                        model, error.code().name, error.details())
            return cached[1]

    async def _describe(self, model: str, version: str) -> dict:
        request = management_pb2.DescribeModelRequest(model_name=model, model_version=version, customized=True)
        try:
            answer = await self.management.DescribeModel(request, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as error:
            if is_unknown_model(error):
                raise UnknownModel(model) from None
            raise
        description = json.loads(answer.msg)[0]
        metadata = description["customizedMetadata"]  # TorchServe parses the handler's JSON
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        self._metadata[(model, version)] = (time.monotonic(), metadata)
        if metadata.get("build_timestamp"):
            self.metrics.model_build.labels(model).set(metadata["build_timestamp"])
        if not version:  # the store/model version check runs on every describe of the default version
            served = str(description.get("modelVersion") or metadata.get("version") or "")
            for callback in self._on_model:
                callback(model, served, metadata)
        return metadata

    async def ping(self) -> bool:
        """Ask TorchServe's ping and update ``up``; returns whether TorchServe answered Healthy."""
        try:
            answer = await self.inference.Ping(empty_pb2.Empty(), timeout=self.call_timeout)
            healthy = json.loads(answer.health).get("status") == "Healthy"
        except grpc.aio.AioRpcError as error:
            healthy = False
            if is_refused(error) and not self._refusal_logged:
                log.warning("TorchServe refused the ping (%s: %s): it runs with token authorisation; "
                            "give the sidecar its key file with --token-file", error.code().name, error.details())
            self._refusal_logged = is_refused(error)
        except ValueError:
            healthy = False
        self.healthy = healthy
        self._set_up(healthy and self.models_loaded)
        self.metrics.torchserve_up.set(int(healthy))
        return healthy

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            log.info("TorchServe is %s", "up" if up else "down")
            for callback in self._on_health_change:
                callback(up)
        self.up = up

    async def poll_workers(self) -> None:
        """Export worker counts per model and status from describe-model."""
        listing = await self.management.ListModels(management_pb2.ListModelsRequest(limit=100), timeout=self.call_timeout)
        counts: dict[tuple[str, str], int] = {}
        loading = []
        for entry in json.loads(listing.msg).get("models", []):
            name = entry["modelName"]
            answer = await self.management.DescribeModel(
                management_pb2.DescribeModelRequest(model_name=name), timeout=self.call_timeout)
            workers = [worker for description in json.loads(answer.msg) for worker in description.get("workers", [])]
            for worker in workers:
                key = (name, worker.get("status", "UNKNOWN"))
                counts[key] = counts.get(key, 0) + 1
            if any(w.get("status") == "READY" for w in workers):
                await self.metadata(name)  # cached (or refreshed) before a request needs it
            else:
                loading.append(name)
        self.metrics.workers.clear()
        for (name, status), count in counts.items():
            self.metrics.workers.labels(name, status).set(count)
        if not loading and not self.models_loaded:
            self.models_loaded = True
            self._set_up(self.healthy)

    async def poll_forever(self) -> None:
        while True:
            if await self.ping():
                try:
                    await self.poll_workers()
                except (grpc.aio.AioRpcError, UnknownModel) as error:
                    log.warning("describe-model poll failed: %s", error)
            await asyncio.sleep(self.poll_interval)
