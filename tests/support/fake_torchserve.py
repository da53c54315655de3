"""TorchServe's inference stub without TorchServe: the real handler, run in this process.

For unit tests of the gateway's logic (:class:`explainserve.sidecar.pipeline.ExplainPipeline`);
what only a real TorchServe shows (batching across clients, workers, the Java frontend) stays
in tests/integration.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from ts.context import Context, RequestProcessor

from explainserve._generated import inference_pb2
from explainserve.model_archive import HANDLERS_DIR, METADATA_FILE, WEIGHTS_FILE
from explainserve.sidecar.catalog import UnknownModel


def image_handler(model: torch.nn.Module, metadata: dict, model_dir: Path):
    """An initialised ImageHandler for ``model``, loaded from ``model_dir`` as TorchServe loads it."""
    torch.save(model.state_dict(), model_dir / WEIGHTS_FILE)
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata))
    if str(HANDLERS_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLERS_DIR))  # TorchServe puts the archive folder on the path the same way
    from image_handler import ImageHandler

    handler = ImageHandler()
    handler.initialize(Context(metadata["name"], str(model_dir), {}, 1, None, "0.12.0"))
    return handler


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The exception a grpc.aio stub raises when the call ends with ``code``."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@dataclass
class FakeTorchServe:
    """``Predictions`` answered by ``handler`` (one request per batch), recorded in ``calls``.

    Set ``fail`` to an AioRpcError to raise it instead, or ``answer`` to bytes to return them.
    """

    handler: object
    calls: list = field(default_factory=list)
    fail: grpc.aio.AioRpcError | None = None
    answer: bytes | None = None

    async def Predictions(self, request: inference_pb2.PredictionsRequest, *, timeout: float | None = None):
        self.calls.append((request, timeout))
        if self.fail is not None:
            raise self.fail
        if self.answer is not None:
            return inference_pb2.PredictionResponse(prediction=self.answer)
        context = Context(request.model_name, "", {}, 1, None, "0.12.0")
        context.request_processor = [RequestProcessor({})]
        (answer,) = self.handler.handle([dict(request.input)], context)
        return inference_pb2.PredictionResponse(prediction=answer)


@dataclass
class FakeCatalog:
    """The catalog of one model: its handler's describe()."""

    handler: object

    async def metadata(self, model: str, version: str = "") -> dict:
        described = self.handler.describe()
        if model != described["name"]:
            raise UnknownModel(model)
        return described
