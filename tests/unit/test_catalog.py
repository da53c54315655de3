"""The gateway's model catalog: metadata is cached for a while, not for ever."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import pytest

from explainserve._generated import management_pb2
from explainserve.sidecar.catalog import ModelCatalog
from explainserve.sidecar.metrics import GatewayMetrics
from support.fake_torchserve import rpc_error


class Management:
    """DescribeModel(customized=true) of one model whose served version and classes can change."""

    def __init__(self):
        self.version, self.classes, self.fail, self.calls = "1.0", ["a", "b"], None, 0

    async def DescribeModel(self, request, timeout=None):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        described = {"name": request.model_name, "version": self.version, "class_names": self.classes}
        return management_pb2.ManagementResponse(msg=json.dumps([{
            "modelName": request.model_name, "modelVersion": self.version,
            "customizedMetadata": json.dumps(described)}]))


def catalog_with(management: Management, ttl: float) -> ModelCatalog:
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never dialled: the stubs are replaced
    catalog = ModelCatalog(channel, channel, GatewayMetrics(), metadata_ttl=ttl)
    catalog.management = management
    return catalog


def test_metadata_is_described_again_once_stale():
    async def scenario():
        management, served = Management(), []
        catalog = catalog_with(management, ttl=0.2)
        catalog.on_model(lambda model, version, described: served.append((version, described["class_names"])))
        first = await catalog.metadata("m")
        again = await catalog.metadata("m")  # fresh: from the cache
        management.version, management.classes = "2.0", ["a", "b", "c"]
        await asyncio.sleep(0.3)
        changed = await catalog.metadata("m")
        return first, again, changed, served, management.calls

    first, again, changed, served, calls = asyncio.run(scenario())
    assert first is again and first["class_names"] == ["a", "b"]
    assert changed["class_names"] == ["a", "b", "c"] and changed["version"] == "2.0"
    # the store/model check runs again, with the handler's new description
    assert served == [("1.0", ["a", "b"]), ("2.0", ["a", "b", "c"])] and calls == 2


def test_a_failed_refresh_keeps_the_last_metadata_and_an_unknown_model_raises():
    async def scenario():
        management = Management()
        catalog = catalog_with(management, ttl=0.0)
        first = await catalog.metadata("m")
        management.fail = rpc_error(grpc.StatusCode.UNAVAILABLE, "busy")
        kept = await catalog.metadata("m")
        management.fail = rpc_error(grpc.StatusCode.INTERNAL, "Model not found: m")
        with pytest.raises(Exception) as unknown:
            await catalog.metadata("m")
        return first, kept, unknown.type.__name__

    first, kept, unknown = asyncio.run(scenario())
    assert kept == first and unknown == "UnknownModel"


class LoadingTorchServe:
    """Ping (always Healthy), ListModels and DescribeModel of models whose workers' statuses
    the test sets."""

    def __init__(self, statuses: dict[str, list[str]]):
        self.statuses = statuses

    async def Ping(self, request, timeout=None):
        return SimpleNamespace(health=json.dumps({"status": "Healthy"}))

    async def ListModels(self, request, timeout=None):
        return management_pb2.ManagementResponse(msg=json.dumps({"models": [{"modelName": m} for m in self.statuses]}))

    async def DescribeModel(self, request, timeout=None):
        name = request.model_name
        described = json.dumps({"name": name, "version": "1.0", "class_names": ["a"]})
        return management_pb2.ManagementResponse(msg=json.dumps([{
            "modelName": name, "modelVersion": "1.0", "customizedMetadata": described,
            "workers": [{"status": status} for status in self.statuses[name]]}]))


def test_ready_only_once_every_model_has_had_a_ready_worker():
    """TorchServe pings Healthy while its workers load; the gateway is up only when each model
    has a READY worker, and a worker restarted later does not take it down."""
    async def scenario():
        torchserve = LoadingTorchServe({"image": ["READY"], "video": []})
        catalog = catalog_with(Management(), ttl=30.0)
        catalog.inference = catalog.management = torchserve
        changes, seen = [], []
        catalog.on_health_change(changes.append)

        async def poll():
            await catalog.ping() and await catalog.poll_workers()
            seen.append(catalog.up)

        await poll()                                  # video's worker not started yet
        torchserve.statuses["video"] = ["UNLOADING"]  # nor ready
        await poll()
        torchserve.statuses["video"] = ["READY"]
        await poll()
        torchserve.statuses["image"] = ["UNLOADING"]  # a worker restarts later
        await poll()
        return seen, changes, catalog.healthy

    seen, changes, healthy = asyncio.run(scenario())
    assert seen == [False, False, True, True] and changes == [True] and healthy


def test_torchserve_serving_no_model_is_ready_when_it_pings_healthy():
    async def scenario():
        catalog = catalog_with(Management(), ttl=30.0)
        catalog.inference = catalog.management = LoadingTorchServe({})
        await catalog.ping() and await catalog.poll_workers()
        return catalog.up

    assert asyncio.run(scenario())
