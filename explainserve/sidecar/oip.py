"""The Open Inference Protocol v2 (``inference.GRPCInferenceService``) on the gateway's port.

ModelInfer runs each element of its batch through the very path of ``Explainer/Explain``
(validation, TorchServe, anomaly scoring, surprise regions) and answers the same status codes.

Inputs (one tensor; its name is free):
- image models: encoded JPEG/PNG images as BYTES ``[N]`` (or ``[N, 1]``), or pixels as UINT8 ``[N, H, W, 3]``;
- video models: clips as UINT8 ``[N, T, H, W, 3]``, or encoded MP4/WebM/AVI files as BYTES ``[N]``.

Request parameters: ``methods`` (comma-separated, e.g. "swag_i_g,jitter_cam"), ``n_segments``,
``wc``, ``wg``, ``jitter_d``, ``target_class``, ``label``, ``top_k`` and ``explain_anomaly``.

Outputs (first dimension N; ask for a subset with the request's ``outputs``):
``probabilities`` FP32 [N, k] and ``classes`` INT64 [N, k] (top-k, best first),
``predicted_class`` INT64 [N], ``heatmap_<method>`` FP32 [N, H, W] (clips [N, T, H, W]) per method,
``segments_<method>`` INT32 for SWAG methods, ``verdict`` BYTES [N] (NORMAL, ANOMALOUS or
UNAVAILABLE: no store), ``verdict_p_value`` FP64 [N] (its conformal p-value: ANOMALOUS exactly
below the store's target rate), ``verdict_smallest_p_value`` FP64 [N] (the smallest p-value the
store can give that class: at or above the target rate its verdict is never ANOMALOUS), ``verdict_score`` FP64 [N] (``ClassVerdict.score``, see
docs/SERVING.md), ``beta`` FP64, ``surprise_count`` and ``expectation_count`` INT32 [N]; without a
verdict the numbers are NaN and the counts -1.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from explainserve import __version__, wire
from explainserve._generated import explain_pb2, grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from explainserve.client import encode_png

from .catalog import UnknownModel
from .metrics import method_label
from .oip_tensors import input_array, output_tensor, parameter_value
from .service import ExplainerService, RpcFailure

PLATFORM = "explainserve"
# parameter -> (accepted Python types, where it goes in the ExplainRequest)
PARAMETERS = {
    "methods": (str, "methods"), "n_segments": (int, "options.n_segments"), "wc": ((int, float), "options.wc"),
    "wg": ((int, float), "options.wg"), "jitter_d": (int, "options.jitter_d"), "target_class": (int, "target_class"),
    "label": (int, "label"), "top_k": (int, "top_k"), "explain_anomaly": (bool, "explain_anomaly"),
}
VERDICT_OUTPUTS = ("verdict", "verdict_p_value", "verdict_smallest_p_value", "verdict_score", "beta", "surprise_count", "expectation_count")


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """OIP v2 in front of the same ``ExplainerService`` the Explain API uses.

    It calls that servicer's own steps (``_metadata``, ``_explain``, ``_measured``) on purpose:
    a second protocol over one path, so the two APIs cannot drift apart in validation, scoring,
    status codes or metrics.
    """

    def __init__(self, explainer: ExplainerService):
        self.explainer = explainer
        self.catalog = explainer.catalog

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.catalog.up)

    async def ModelReady(self, request, context):
        try:
            await self.catalog.metadata(request.name, request.version)
        except (UnknownModel, grpc.aio.AioRpcError):
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self.catalog.up)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name=PLATFORM, version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            metadata = await self.explainer.pipeline.metadata(request.name, request.version)  # Explain's own lookup
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message.replace("model:", "name:", 1))
        return model_metadata(request.name, metadata)

    async def ModelInfer(self, request, context):
        try:
            label = method_label(explain_template(request).methods)
        except ValueError:
            label = "invalid"  # _infer answers why
        return await self.explainer._measured("ModelInfer", label, self._infer(request, context), context)

    async def _infer(self, request, context) -> oip.ModelInferResponse:
        metadata = await self.explainer.pipeline.metadata(request.model_name, request.model_version)
        try:
            template = explain_template(request)
            requests = explain_requests(request, template, metadata)
            wanted = [output.name for output in request.outputs]
            check_outputs(wanted, template, metadata)
        except ValueError as error:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        label = method_label(template.methods)
        answers = await asyncio.gather(*(self.explainer.pipeline.explain(r, context.time_remaining, label)
                                         for r in requests))
        return infer_response(request, answers, wanted)


def explain_template(request) -> explain_pb2.ExplainRequest:
    """An ExplainRequest holding the ModelInfer parameters (everything but the input)."""
    template = explain_pb2.ExplainRequest(model=request.model_name, model_version=request.model_version)
    for name, parameter in request.parameters.items():
        if name not in PARAMETERS:
            raise ValueError(f"parameters.{name}: unknown; accepted: {', '.join(PARAMETERS)}")
        kinds, field = PARAMETERS[name]
        value = parameter_value(parameter)
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise ValueError(f"parameters.{name}: expected {getattr(kinds, '__name__', 'a number')}, got {value!r}")
        if name == "methods":
            template.methods.extend(m.strip() for m in value.split(",") if m.strip())
        elif field.startswith("options."):
            setattr(template.options, field.split(".")[1], value)
        else:
            setattr(template, field, value)
    return template


def explain_requests(request, template: explain_pb2.ExplainRequest, metadata: dict) -> list[explain_pb2.ExplainRequest]:
    """One ExplainRequest per batch element of the request's single input tensor."""
    if len(request.inputs) != 1:
        raise ValueError(f"inputs: expected one tensor (images or clips), got {len(request.inputs)}")
    tensor = request.inputs[0]
    what = f"inputs[0] ({tensor.name})"
    if request.raw_input_contents and len(request.raw_input_contents) != 1:
        raise ValueError(f"raw_input_contents: expected one entry per input (1), got {len(request.raw_input_contents)}")
    data = input_array(tensor, request.raw_input_contents[0] if request.raw_input_contents else None, what)
    shape = list(tensor.shape)
    kind = metadata["kind"]
    requests = []
    if kind == "image" and tensor.datatype == "BYTES" and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        for item in data:
            requests.append(explain_pb2.ExplainRequest(image=item))
    elif kind == "image" and tensor.datatype == "UINT8" and len(shape) == 4 and shape[3] == 3:
        for image in data:
            requests.append(explain_pb2.ExplainRequest(image=encode_png(image)))  # lossless: the same pixels
    elif kind == "video" and tensor.datatype == "BYTES" and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        for item in data:
            requests.append(explain_pb2.ExplainRequest(clip=explain_pb2.Clip(video=item)))
    elif kind == "video" and tensor.datatype == "UINT8" and len(shape) == 5 and shape[4] == 3:
        for clip in data:
            requests.append(explain_pb2.ExplainRequest(clip=explain_pb2.Clip(raw=clip.tobytes(), shape=clip.shape)))
    else:
        accepted = ("BYTES [N] of encoded JPEG/PNG images, or UINT8 [N, H, W, 3]" if kind == "image"
                    else "BYTES [N] of encoded MP4/WebM/AVI files, or UINT8 [N, T, H, W, 3]")
        raise ValueError(f"{what}: {kind} model {metadata['name']!r} takes {accepted}; "
                         f"got {tensor.datatype} {shape}")
    if not requests:
        raise ValueError(f"{what}: the batch is empty")
    for explain_request in requests:
        explain_request.MergeFrom(template)
    return requests


def output_names(template: explain_pb2.ExplainRequest, metadata: dict) -> list[str]:
    """Every output a request with ``template``'s methods answers."""
    maps = [f"heatmap_{m}" for m in template.methods] + [f"segments_{m}" for m in template.methods if m.startswith("swag")]
    return ["probabilities", "classes", "predicted_class", *maps, *VERDICT_OUTPUTS]


def check_outputs(wanted: list[str], template: explain_pb2.ExplainRequest, metadata: dict) -> None:
    unknown = sorted(set(wanted) - set(output_names(template, metadata)))
    if unknown:
        raise ValueError(f"outputs: {unknown} not answered for these parameters; "
                         f"available: {output_names(template, metadata)}")


def verdict_values(response: explain_pb2.ExplainResponse) -> tuple:
    """(verdict, p-value, smallest p-value, score, beta, surprise count, expectation count) of the
    predicted class."""
    anomaly = response.anomaly
    if anomaly.status != explain_pb2.AnomalyReport.OK or not anomaly.HasField("predicted"):
        return "UNAVAILABLE", np.nan, np.nan, np.nan, np.nan, -1, -1
    verdict = anomaly.predicted
    return (explain_pb2.ClassVerdict.Verdict.Name(verdict.verdict), verdict.p_value, verdict.smallest_p_value,
            verdict.score, verdict.beta, verdict.surprise_count, verdict.expectation_count)


def infer_response(request, answers: list[explain_pb2.ExplainResponse], wanted: list[str]) -> oip.ModelInferResponse:
    first = answers[0]
    outputs = {
        "probabilities": np.array([[c.score for c in a.classes] for a in answers], np.float32),
        "classes": np.array([[c.index for c in a.classes] for a in answers], np.int64),
        "predicted_class": np.array([a.predicted_class for a in answers], np.int64),
    }
    for index, explanation in enumerate(first.explanations):
        method = explanation.method
        outputs[f"heatmap_{method}"] = np.stack([wire.to_numpy(a.explanations[index].heatmap) for a in answers])
        if explanation.HasField("segments"):
            outputs[f"segments_{method}"] = np.stack([wire.to_numpy(a.explanations[index].segments)
                                                      for a in answers]).astype(np.int32)
    verdict, p_value, smallest, score, beta, surprise, missing = zip(*(verdict_values(a) for a in answers))
    outputs["verdict"] = list(verdict)
    outputs["verdict_p_value"] = np.array(p_value, np.float64)
    outputs["verdict_smallest_p_value"] = np.array(smallest, np.float64)
    outputs["verdict_score"] = np.array(score, np.float64)
    outputs["beta"] = np.array(beta, np.float64)
    outputs["surprise_count"] = np.array(surprise, np.int32)
    outputs["expectation_count"] = np.array(missing, np.int32)
    response = oip.ModelInferResponse(model_name=first.model, model_version=first.model_version, id=request.id)
    for name in wanted or outputs:
        tensor, raw = output_tensor(name, outputs[name])
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    return response


def model_metadata(name: str, metadata: dict) -> oip.ModelMetadataResponse:
    """Inputs and outputs of a served model, from its handler's description."""
    tensor = oip.ModelMetadataResponse.TensorMetadata
    size = list(metadata["input_size"])
    if metadata["kind"] == "image":
        inputs = [tensor(name="image", datatype="BYTES", shape=[-1]),
                  tensor(name="pixels", datatype="UINT8", shape=[-1, -1, -1, 3])]
    else:
        inputs = [tensor(name="video", datatype="BYTES", shape=[-1]),
                  tensor(name="clip", datatype="UINT8", shape=[-1, -1, -1, -1, 3])]
    maps = [[tensor(name=f"heatmap_{m}", datatype="FP32", shape=[-1, *size])]
            + ([tensor(name=f"segments_{m}", datatype="INT32", shape=[-1, *size])] if m.startswith("swag") else [])
            for m in metadata["methods"]]
    outputs = [tensor(name="probabilities", datatype="FP32", shape=[-1, -1]),
               tensor(name="classes", datatype="INT64", shape=[-1, -1]),
               tensor(name="predicted_class", datatype="INT64", shape=[-1]),
               *(t for group in maps for t in group),
               tensor(name="verdict", datatype="BYTES", shape=[-1]),
               tensor(name="verdict_p_value", datatype="FP64", shape=[-1]),
               tensor(name="verdict_smallest_p_value", datatype="FP64", shape=[-1]),
               tensor(name="verdict_score", datatype="FP64", shape=[-1]),
               tensor(name="beta", datatype="FP64", shape=[-1]),
               tensor(name="surprise_count", datatype="INT32", shape=[-1]),
               tensor(name="expectation_count", datatype="INT32", shape=[-1])]
    return oip.ModelMetadataResponse(name=name, versions=[str(metadata.get("version", ""))], platform=PLATFORM,
                                     inputs=inputs, outputs=outputs)
