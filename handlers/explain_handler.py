"""TorchServe handler shared by the image and video handlers: parse -> Explainer -> encode.

Two request forms reach ``handle``:

- internal: the gateway's serialised ``explainserve.v1.ExplainRequest`` under the input key
  ``REQUEST_KEY``; the answer is a serialised ``explainserve.v1.HandlerResponse``;
- plain: ``{"data": <bytes>}`` (or ``body``) from any TorchServe client; the answer is JSON
  with the top classes and the default methods' maps;
- region: the internal form plus a serialised ``explainserve.v1.RegionRequest`` under
  ``REGION_KEY``; the answer's ``regions`` hold, per requested filter, the superpixel that
  triggered it (thesis 6.3.2), with the surprise-suppression counterfactual (6.4.1) when the
  RegionRequest asks for it, and the request's methods are not run.

Every item of a batch gets its own answer: a bad item's error is written into its answer
(``HandlerError`` or ``{"error": ...}``) and never raised, because raising fails the batch.
Items asking for the same methods and options are explained in one probe pass.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from explainserve import wire
from explainserve._generated import explain_pb2, handler_pb2
from explainserve.devices import serving_device
from explainserve.explainer import DEFAULT_METHODS, ExplainOptions, Explainer
from explainserve.inputs import InputTooLarge
from explainserve.model_archive import load_model
from explainserve.surprise import REGION_SEGMENTS
from explainserve.wire import CODE_NAMES, DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED

REQUEST_KEY = wire.HANDLER_REQUEST_KEY
REGION_KEY = wire.REGION_REQUEST_KEY
PLAIN_KEYS = ("data", "body")
# The answer to a request whose caller gave up: it is not decoded (or not run once decoded).
DEADLINE_PASSED = handler_pb2.HandlerError(code=DEADLINE_EXCEEDED, message="the caller's deadline passed; not run")
# Tests only: seconds to sleep in every handle() call, to exercise the gateway's deadlines.
TEST_DELAY_ENV = "EXPLAINSERVE_TEST_HANDLER_DELAY_S"


@dataclass(frozen=True)
class ExplainItem:
    """One Explain request of a batch, decoded and checked."""

    sample: np.ndarray
    methods: tuple[str, ...] | None  # None: the kind's default methods
    options: ExplainOptions
    target: int | None = None
    label: int | None = None
    internal: bool = True
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class RegionItem:
    """One region request of a batch (the gateway's RegionRequest beside an ExplainRequest that
    carries the input), decoded and checked.

    Attributes
    ----------
    regions : tuple of (filter, class or None)
        The filters whose regions are asked for, each with the class backpropagated.
    n_segments : int
        Superpixels of the region map.
    suppression_steps : int
        How many superpixels surprise suppression may delete (0: no suppression).
    """

    sample: np.ndarray
    regions: tuple[tuple[int, int | None], ...]
    n_segments: int = REGION_SEGMENTS
    suppression_steps: int = 0
    decode_seconds: float = 0.0


class ExplainHandler:
    """Base TorchServe handler; subclasses set ``kind`` and decode plain payloads."""

    kind = ""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = properties["model_dir"]
        model, self.metadata = load_model(model_dir)
        # The GPU TorchServe assigned this worker (none on CPU hosts); SLIC stays on the CPU.
        self.device = serving_device(properties.get("gpu_id"))
        if self.metadata["kind"] != self.kind:
            raise ValueError(f"metadata kind {self.metadata['kind']!r} does not match the {self.kind} handler")
        self.explainer = Explainer(
            model, kind=self.kind, input_size=self.metadata["input_size"], mean=self.metadata["mean"],
            std=self.metadata["std"], class_names=self.metadata["class_names"], layer=self.metadata.get("layer"),
            device=self.device, multi_label=self.metadata.get("multi_label", False),
        )
        self.test_delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        self.initialized = True

    # -- TorchServe entry point ------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[bytes]:
        started = time.perf_counter()
        if context is not None and context.get_request_header(0, "describe") == "True":
            return [json.dumps(self.describe())]
        if self.test_delay:
            time.sleep(self.test_delay)
        parsed: list[ExplainItem | RegionItem | handler_pb2.HandlerError] = [self.parse(item) for item in data]
        answers: list[bytes | None] = [None] * len(data)
        groups: dict[tuple, list[int]] = {}
        region_groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(parsed):
            if isinstance(item, RegionItem):
                region_groups.setdefault((item.n_segments, item.suppression_steps), []).append(index)
            elif isinstance(item, ExplainItem):
                groups.setdefault((item.methods, item.options), []).append(index)
        for (n_segments, steps), indices in region_groups.items():
            self.answer_regions(parsed, answers, indices, n_segments, steps)
        for (methods, _), indices in groups.items():
            items = [parsed[i] for i in indices]
            try:
                results = self.explainer.explain(
                    [item.sample for item in items], methods, items[0].options,
                    targets=[item.target for item in items], labels=[item.label for item in items],
                )
            except Exception as error:  # noqa: BLE001 - every item must get an answer
                code = INVALID_ARGUMENT if isinstance(error, ValueError) else INTERNAL
                for i in indices:
                    parsed[i] = handler_pb2.HandlerError(code=code, message=f"{type(error).__name__}: {error}")
                continue
            for i, item, result in zip(indices, items, results):
                answers[i] = self.encode(item, result, batch_size=len(data), handler_seconds=time.perf_counter() - started)
        for i, item in enumerate(parsed):
            if isinstance(item, handler_pb2.HandlerError):
                answers[i] = self.encode_error(item, internal=self.is_internal(data[i]))
        return answers

    # -- parsing ---------------------------------------------------------------------
    def describe(self) -> dict:
        """What the gateway needs to check requests before forwarding them: the model's
        identity and class names, and its :class:`~explainserve.limits.Limits` fields."""
        return {
            "name": self.metadata["name"],
            "version": self.metadata.get("version", ""),
            "class_names": self.explainer.class_names,
            "multi_label": self.explainer.multi_label,
            "layer": self.explainer.layer,
            "mean": list(self.metadata["mean"]),
            "std": list(self.metadata["std"]),
            "build_timestamp": self.metadata.get("build_timestamp"),
            **self.explainer.limits.as_dict(),
        }

    @staticmethod
    def is_internal(item: dict) -> bool:
        return REQUEST_KEY in item

    def parse(self, item: dict) -> ExplainItem | RegionItem | handler_pb2.HandlerError:
        """Decode one batch item; any problem becomes that item's HandlerError."""
        started = time.perf_counter()
        if wire.deadline_passed(item.get(wire.DEADLINE_KEY)):
            return DEADLINE_PASSED
        try:
            if self.is_internal(item):
                request = explain_pb2.ExplainRequest.FromString(bytes(item[REQUEST_KEY]))
                parsed = self.parse_internal(request)
            else:
                payload = next((item[key] for key in PLAIN_KEYS if item.get(key) is not None), None)
                if payload is None:
                    raise ValueError(f"request has no {' or '.join(PLAIN_KEYS)} entry and no {REQUEST_KEY}")
                if isinstance(payload, str):
                    payload = payload.encode("latin-1")
                parsed = ExplainItem(sample=self.decode_plain(bytes(payload)), methods=None,
                                     options=ExplainOptions(), internal=False)
            self.explainer.check_request(parsed.methods if parsed.methods is not None else DEFAULT_METHODS[self.kind],
                                         parsed.options, parsed.target, parsed.label)
            if self.is_internal(item) and item.get(REGION_KEY) is not None:
                parsed = self.parse_regions(parsed, handler_pb2.RegionRequest.FromString(bytes(item[REGION_KEY])))
        except InputTooLarge as error:
            return handler_pb2.HandlerError(code=RESOURCE_EXHAUSTED, message=str(error))
        except ValueError as error:
            return handler_pb2.HandlerError(code=INVALID_ARGUMENT, message=str(error))
        except Exception as error:  # noqa: BLE001 - a malformed item must not fail its batch
            return handler_pb2.HandlerError(code=INVALID_ARGUMENT, message=f"malformed request: {type(error).__name__}: {error}")
        parsed = replace(parsed, decode_seconds=time.perf_counter() - started)
        return DEADLINE_PASSED if wire.deadline_passed(item.get(wire.DEADLINE_KEY)) else parsed

    def parse_internal(self, request: explain_pb2.ExplainRequest) -> ExplainItem:
        options = request.options
        return ExplainItem(
            sample=self.decode_request(request),
            methods=tuple(request.methods),
            options=ExplainOptions(
                n_segments=options.n_segments if options.HasField("n_segments") else None,
                wc=options.wc if options.HasField("wc") else None,
                wg=options.wg if options.HasField("wg") else None,
                jitter_d=options.jitter_d if options.HasField("jitter_d") else None,
                top_k=request.top_k or None,  # 0: the model's default
            ),
            target=request.target_class if request.HasField("target_class") else None,
            label=request.label if request.HasField("label") else None,
        )

    def parse_regions(self, parsed: ExplainItem, region: handler_pb2.RegionRequest) -> RegionItem:
        """The region request on ``parsed``'s input; ValueError naming the bad field."""
        regions = tuple((e.filter, e.class_index if e.HasField("class_index") else None) for e in region.filters)
        n_segments = region.n_segments or REGION_SEGMENTS
        self.explainer.limits.check_region_request([f for f, _ in regions], [c for _, c in regions], n_segments,
                                                   region.suppression_steps)
        return RegionItem(sample=parsed.sample, regions=regions, n_segments=n_segments,
                          suppression_steps=region.suppression_steps)

    def decode_request(self, request: explain_pb2.ExplainRequest) -> np.ndarray:
        raise NotImplementedError

    def decode_plain(self, payload: bytes) -> np.ndarray:
        raise NotImplementedError

    def answer_regions(self, parsed: list, answers: list, indices: list[int], n_segments: int, steps: int) -> None:
        """One filter_regions pass for every (item, filter) pair of these region items, and one
        suppression pass over them when ``steps`` > 0; each item's sample is prepared once."""
        pairs = [(i, region) for i in indices for region in parsed[i].regions]
        try:
            prepared = self.explainer.prepare([parsed[i].sample for i in indices])
            prepared = prepared.take([indices.index(i) for i, _ in pairs])
            regions = self.explainer.filter_regions(
                prepared, [f for _, (f, _) in pairs], targets=[c for _, (_, c) in pairs], n_segments=n_segments,
            )
            suppressions = self.explainer.suppress_surprise(prepared, regions, steps) if steps else [None] * len(regions)
        except Exception as error:  # noqa: BLE001 - every item must get an answer
            code = INVALID_ARGUMENT if isinstance(error, ValueError) else INTERNAL
            for i in indices:
                parsed[i] = handler_pb2.HandlerError(code=code, message=f"{type(error).__name__}: {error}")
            return
        for i in indices:
            answer = handler_pb2.HandlerResponse()
            for (owner, _), region, suppression in zip(pairs, regions, suppressions):
                if owner == i:
                    added = answer.regions.add(
                        filter=region.filter, class_index=region.target, top_segment=region.top_segment,
                        alpha=region.alpha, heatmap=wire.quantized_tensor(region.heatmap),
                        segments=wire.exact_tensor(region.segments), segment_scores=wire.exact_tensor(region.segment_scores),
                    )
                    if suppression is not None:
                        added.suppression.CopyFrom(explain_pb2.Suppression(
                            deleted_segments=suppression.deleted_segments.tolist(),
                            predicted=suppression.predicted.tolist(),
                            probabilities=suppression.probabilities.tolist(),
                            prediction_changed=suppression.changed, predicted_after=suppression.predicted_after))
            answers[i] = answer.SerializeToString()

    # -- encoding --------------------------------------------------------------------
    def encode(self, item: ExplainItem, result, *, batch_size: int, handler_seconds: float) -> bytes:
        if not item.internal:
            return json.dumps(self.plain_answer(result)).encode()
        names = self.explainer.class_names
        response = explain_pb2.ExplainResponse(
            model=self.metadata["name"],
            model_version=str(self.metadata.get("version", "")),
            classes=[explain_pb2.ClassScore(index=int(c), name=names[int(c)], score=float(s))
                     for c, s in zip(result.classes, result.scores)],
            predicted_class=result.predicted,
            target_class=result.target,
            timings=explain_pb2.Timings(
                decode=item.decode_seconds + result.timings.get("preprocess", 0.0),
                network=result.timings.get("network", 0.0),
                superpixels=result.timings.get("superpixels", 0.0),
                jitter_cam=result.timings.get("jitter_cam", 0.0),
                handler=handler_seconds,
                batch_size=batch_size,
            ),
        )
        for method in item.methods:
            explanation_map = result.maps[method]
            explanation = response.explanations.add(method=method, heatmap=wire.quantized_tensor(explanation_map.heatmap))
            if explanation_map.segments is not None:
                explanation.segments.CopyFrom(wire.exact_tensor(explanation_map.segments))
                explanation.segment_scores.CopyFrom(wire.exact_tensor(explanation_map.segment_scores.astype(np.float32)))
        answer = handler_pb2.HandlerResponse(response=response, alpha=result.alpha.tolist(),
                                             features=result.features.tolist())
        if result.label_alpha is not None:
            answer.label_alpha.extend(result.label_alpha.tolist())
        return answer.SerializeToString()

    def plain_answer(self, result) -> dict:
        names = self.explainer.class_names
        return {
            "model": self.metadata["name"],
            "predicted_class": result.predicted,
            "classes": [{"index": int(c), "name": names[int(c)], "score": float(s)}
                        for c, s in zip(result.classes, result.scores)],
            "explanations": {method: {"shape": list(m.heatmap.shape), "heatmap": np.round(m.heatmap, 5).tolist()}
                             for method, m in result.maps.items()},
        }

    @staticmethod
    def encode_error(error: handler_pb2.HandlerError, *, internal: bool) -> bytes:
        if internal:
            return handler_pb2.HandlerResponse(error=error).SerializeToString()
        code = CODE_NAMES.get(error.code, "INTERNAL")
        return json.dumps({"error": {"code": code, "message": error.message}}).encode()
