"""The handler in-process with TorchServe's own Context: one answer per item, grouping, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from explainserve.client import build_request
from explainserve.explainer import ExplainOptions
from explainserve.model_archive import METADATA_FILE, WEIGHTS_FILE, HANDLERS_DIR
from explainserve.limits import Limits
from explainserve.wire import HANDLER_REQUEST_KEY, INVALID_ARGUMENT, REGION_REQUEST_KEY, RESOURCE_EXHAUSTED, to_numpy
from explainserve._generated import handler_pb2
from support.serving_harness import explainer_for, png, random_image, tiny_image_model

sys.path.insert(0, str(HANDLERS_DIR))  # TorchServe puts the archive folder on the path the same way
from image_handler import ImageHandler  # noqa: E402


@pytest.fixture(scope="module")
def model_and_handler(tmp_path_factory):
    model, metadata = tiny_image_model()
    model_dir = tmp_path_factory.mktemp("archive")
    torch.save(model.state_dict(), model_dir / WEIGHTS_FILE)
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata))
    handler = ImageHandler()
    handler.initialize(Context("tiny_image", str(model_dir), {}, 4, None, "0.12.0"))
    return model, metadata, handler


def handle(handler, items, headers=None):
    context = Context("tiny_image", "", {}, len(items), None, "0.12.0")
    context.request_processor = [RequestProcessor(headers or {}) for _ in items]
    return handler.handle(items, context)


def internal(**fields) -> dict:
    return {HANDLER_REQUEST_KEY: build_request(model="tiny_image", **fields).SerializeToString()}


def test_mixed_batch_answers_each_item_in_order(model_and_handler):
    model, metadata, handler = model_and_handler
    images = [random_image(60 + i) for i in range(4)]
    items = [
        internal(data=png(images[0]), methods=["grad_cam"], label=5),
        internal(data=png(images[1]), methods=["swag_i"], n_segments=12),
        {"data": png(images[2])},
        internal(data=png(images[3]), methods=["grad_cam"], target_class=2),
    ]
    answers = handle(handler, items)
    assert len(answers) == 4
    explainer = explainer_for(model, metadata)
    first, second, fourth = (handler_pb2.HandlerResponse.FromString(answers[i]).response for i in (0, 1, 3))
    expected_cam = explainer.explain([images[0], images[3]], ["grad_cam"], targets=[None, 2], labels=[5, None])
    scored = handler_pb2.HandlerResponse.FromString(answers[0])  # Grad-AMap scores for the anomaly scorer
    np.testing.assert_allclose(scored.alpha, expected_cam[0].alpha, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scored.label_alpha, expected_cam[0].label_alpha, rtol=1e-4, atol=1e-7)
    assert len(scored.alpha) == 512 and not handler_pb2.HandlerResponse.FromString(answers[3]).label_alpha
    # The pooled features beside alpha, for the feature tests: one row per item, from the same pass.
    pooled = explainer.filter_scores([images[0], images[3]]).features
    for row, answer in enumerate((answers[0], answers[3])):
        served = handler_pb2.HandlerResponse.FromString(answer).features
        np.testing.assert_allclose(served, expected_cam[row].features, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(served, pooled[row], rtol=1e-5, atol=1e-7)
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-4  # distinct rows: a mix-up would fail
    for response, expected in ((first, expected_cam[0]), (fourth, expected_cam[1])):
        assert response.target_class == expected.target and response.timings.batch_size == 4
        heatmap = to_numpy(response.explanations[0].heatmap)
        assert np.abs(heatmap - expected.maps["grad_cam"].heatmap).max() <= response.explanations[0].heatmap.scale / 2 + 1e-6
    swag = explainer.explain([images[1]], ["swag_i"], ExplainOptions(n_segments=12))[0]
    assert np.array_equal(to_numpy(second.explanations[0].segments), swag.maps["swag_i"].segments)
    plain = json.loads(answers[2])
    assert plain["predicted_class"] == explainer.explain([images[2]], [])[0].predicted
    assert sorted(plain["explanations"]) == ["jitter_cam", "swag_i_g"]


def test_bad_items_get_in_band_errors_and_neighbours_are_answered(model_and_handler):
    _, _, handler = model_and_handler
    items = [
        {HANDLER_REQUEST_KEY: b"\xff\x00 not a protobuf"},
        internal(data=png(random_image(70)), methods=["grad_cam"]),
        internal(data=png(random_image(71)), methods=["jitter_cam"], jitter_d=-3),
        {"data": b"GIF89a"},
        {"something": b"else"},
    ]
    answers = handle(handler, items)
    errors = [handler_pb2.HandlerResponse.FromString(answers[i]) for i in (0, 2)]
    assert [e.WhichOneof("result") for e in errors] == ["error", "error"]
    assert errors[0].error.code == 3 and errors[1].error.code == 3 and "jitter_d" in errors[1].error.message
    assert handler_pb2.HandlerResponse.FromString(answers[1]).WhichOneof("result") == "response"
    assert json.loads(answers[3])["error"]["code"] == "INVALID_ARGUMENT"
    assert "data" in json.loads(answers[4])["error"]["message"]


def test_describe_reports_what_the_gateway_validates_against(model_and_handler):
    _, metadata, handler = model_and_handler
    [answer] = handle(handler, [{}], headers={"describe": "True"})
    described = json.loads(answer)
    assert described["kind"] == "image" and described["input_size"] == metadata["input_size"]
    assert described["class_names"] == metadata["class_names"] and described["multi_label"] is False
    assert described["methods"] == ["swag_i", "swag_g", "swag_i_g", "jitter_cam", "grad_cam"]
    assert described["max_n_segments"] == 64 * 64 // 4 and described["cam_size"] == [2, 2]
    assert described["default_n_segments"] == 24  # 300 * 64² / 224², the thesis's superpixel area
    assert described["max_region_filters"] == 8
    # what the gateway compares a distribution store with (StoreMeta.misfits)
    assert (described["layer"], described["num_filters"]) == (handler.explainer.layer, handler.explainer.num_filters)
    assert (described["mean"], described["std"]) == (metadata["mean"], metadata["std"])
    assert Limits.from_dict(described) == handler.explainer.limits


def test_a_multi_label_archive_is_served_with_sigmoid_scores(tmp_path):
    model, metadata = tiny_image_model()
    torch.save(model.state_dict(), tmp_path / WEIGHTS_FILE)
    (tmp_path / METADATA_FILE).write_text(json.dumps({**metadata, "multi_label": True}))
    handler = ImageHandler()
    handler.initialize(Context("tiny_image", str(tmp_path), {}, 4, None, "0.12.0"))
    [described] = handle(handler, [{}], headers={"describe": "True"})
    assert json.loads(described)["multi_label"] is True
    image = random_image(90)
    internal_answer, plain_answer = handle(handler, [internal(data=png(image), methods=["grad_cam"], top_k=3),
                                                     {"data": png(image)}])
    explainer = explainer_for(model, metadata)
    with torch.no_grad():
        logits = model(explainer.prepare([image]).inputs)[0].double()
    best = torch.argsort(logits, descending=True)[:3]
    response = handler_pb2.HandlerResponse.FromString(internal_answer).response
    assert [c.index for c in response.classes] == best.tolist()
    np.testing.assert_allclose([c.score for c in response.classes], torch.sigmoid(logits[best]).numpy(), rtol=1e-6)
    assert sum(c.score for c in response.classes) > 1  # three sigmoids near 0.5, never a softmax
    plain = json.loads(plain_answer)
    assert [c["index"] for c in plain["classes"]][:3] == best.tolist()
    np.testing.assert_allclose([c["score"] for c in plain["classes"]][:3], torch.sigmoid(logits[best]).numpy(), rtol=1e-6)


def test_oversized_input_is_resource_exhausted_and_top_k_follows_the_limits(model_and_handler):
    # A PNG that claims 8193 pixels per side is refused from its header as InputTooLarge: the
    # gateway answers that HandlerError code (8) with RESOURCE_EXHAUSTED, not INVALID_ARGUMENT.
    _, _, handler = model_and_handler
    image = random_image(95)
    items = [internal(data=png(np.zeros((8, 8193, 3), np.uint8)), methods=[]),
             internal(data=png(image), methods=[]),
             internal(data=png(image), methods=[], top_k=7),
             {"data": png(np.zeros((8, 8193, 3), np.uint8))}]
    too_big, default, too_many, plain = handle(handler, items)
    too_big, default, too_many = (handler_pb2.HandlerResponse.FromString(a) for a in (too_big, default, too_many))
    assert too_big.error.code == RESOURCE_EXHAUSTED == 8 and "8193" in too_big.error.message
    assert json.loads(plain)["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert len(default.response.classes) == 5  # min(5, 6 classes)
    assert too_many.error.code == INVALID_ARGUMENT and "top_k: must be in [1, 6]" in too_many.error.message


def region_item(image, filters, n_segments=0) -> dict:
    """An internal item asking for the regions of (filter, class or None) pairs."""
    request = handler_pb2.RegionRequest(n_segments=n_segments)
    for filter_id, class_index in filters:
        entry = request.filters.add(filter=filter_id)
        if class_index is not None:
            entry.class_index = class_index
    return {**internal(data=png(image), methods=["swag_i_g"]), REGION_REQUEST_KEY: request.SerializeToString()}


def test_items_are_parsed_into_their_own_frozen_types(model_and_handler):
    from explain_handler import ExplainItem, RegionItem

    _, _, handler = model_and_handler
    region = handler.parse(region_item(random_image(87), [(3, None), (9, 1)], n_segments=20))
    explain = handler.parse(internal(data=png(random_image(88)), methods=["grad_cam"], label=2))
    assert isinstance(region, RegionItem) and region.regions == ((3, None), (9, 1)) and region.n_segments == 20
    assert isinstance(explain, ExplainItem) and explain.methods == ("grad_cam",) and explain.label == 2
    assert region.decode_seconds > 0 and explain.decode_seconds > 0
    with pytest.raises(AttributeError):
        explain.methods = ()


def test_a_region_batch_prepares_each_sample_once(model_and_handler, monkeypatch):
    # Two items with two filters each, and the suppression pass: one preprocess of two samples.
    _, _, handler = model_and_handler
    calls = []
    preprocess = handler.explainer.preprocess
    monkeypatch.setattr(handler.explainer, "preprocess", lambda samples: calls.append(len(samples)) or preprocess(samples))
    items = []
    for seed in (85, 86):
        item = region_item(random_image(seed), [(3, None), (9, 1)])
        request = handler_pb2.RegionRequest.FromString(item[REGION_REQUEST_KEY])
        request.suppression_steps = 3
        items.append({**item, REGION_REQUEST_KEY: request.SerializeToString()})
    answers = [handler_pb2.HandlerResponse.FromString(a) for a in handle(handler, items)]
    assert [len(a.regions) for a in answers] == [2, 2] and answers[1].regions[1].HasField("suppression")
    assert calls == [2]


def test_region_items_answer_the_filter_regions_beside_ordinary_items(model_and_handler):
    model, metadata, handler = model_and_handler
    images = [random_image(80 + i) for i in range(3)]
    items = [
        region_item(images[0], [(7, None), (300, 4)]),
        internal(data=png(images[1]), methods=["grad_cam"]),
        region_item(images[2], [(511, 2)], n_segments=20),
    ]
    answers = [handler_pb2.HandlerResponse.FromString(a) for a in handle(handler, items)]
    assert [a.WhichOneof("result") for a in answers] == [None, "response", None]
    assert answers[1].response.explanations[0].method == "grad_cam" and not answers[1].regions
    explainer = explainer_for(model, metadata)
    expected = explainer.filter_regions([images[0], images[0]], [7, 300], targets=[None, 4])
    expected += explainer.filter_regions([images[2]], [511], targets=[2], n_segments=20)
    got = list(answers[0].regions) + list(answers[2].regions)
    assert [r.filter for r in got] == [7, 300, 511] and not answers[0].alpha and not answers[0].features
    for region, reference in zip(got, expected):
        assert region.class_index == reference.target and region.top_segment == reference.top_segment
        assert np.array_equal(to_numpy(region.segments), reference.segments)
        np.testing.assert_allclose(to_numpy(region.segment_scores), reference.segment_scores, rtol=1e-4, atol=1e-9)
        assert np.abs(to_numpy(region.heatmap) - reference.heatmap).max() <= region.heatmap.scale / 2 + 1e-6
        assert region.alpha == pytest.approx(reference.alpha, rel=1e-4, abs=1e-9)
    assert got[0].class_index == explainer.explain([images[0]], [])[0].predicted


@pytest.mark.parametrize(
    ("filters", "n_segments", "message"),
    [
        ([], 0, "filters: a RegionRequest needs 1 to 8 filters, got 0"),
        ([(0, None)] * 9, 0, "filters: a RegionRequest needs 1 to 8 filters, got 9"),
        ([(512, None)], 0, "filter: must be in [0, 511], got 512"),
        ([(1, 6)], 0, "class_index: class id must be in [0, 5], got 6"),
        ([(1, None)], 5000, "n_segments: must be in [1, 1024]"),
    ],
)
def test_bad_region_requests_get_in_band_errors(model_and_handler, filters, n_segments, message):
    _, _, handler = model_and_handler
    items = [region_item(random_image(90), filters, n_segments), internal(data=png(random_image(91)), methods=[])]
    bad, good = (handler_pb2.HandlerResponse.FromString(a) for a in handle(handler, items))
    assert bad.WhichOneof("result") == "error" and bad.error.code == 3 and message in bad.error.message
    assert good.WhichOneof("result") == "response"


def test_a_request_whose_caller_gave_up_is_neither_decoded_nor_run(model_and_handler):
    from explainserve.wire import DEADLINE_KEY, deadline_entry

    _, _, handler = model_and_handler
    undecodable = png(random_image(70, (64, 64)))[:64]  # a valid header; decoding it fails
    items = [
        {**internal(data=undecodable, methods=["grad_cam"]), DEADLINE_KEY: deadline_entry(-0.001)},
        {**internal(data=png(random_image(71)), methods=["grad_cam"]), DEADLINE_KEY: deadline_entry(60)},
        {**internal(data=undecodable, methods=["grad_cam"]), DEADLINE_KEY: deadline_entry(60)},
    ]
    gone, live, bad = (handler_pb2.HandlerResponse.FromString(answer) for answer in handle(handler, items))
    assert gone.WhichOneof("result") == "error" and gone.error.code == 4, gone  # DEADLINE_EXCEEDED, not decoded
    assert "deadline passed" in gone.error.message
    assert live.WhichOneof("result") == "response" and len(live.response.explanations) == 1
    assert bad.error.code == 3 and "not a decodable JPEG or PNG" in bad.error.message  # decoded: refused as such


def test_a_group_whose_network_pass_raises_answers_each_of_its_items_and_spares_the_other_groups(model_and_handler):
    # The model fails on any batch holding a blank picture, as a real network can fail on one
    # batch: both items of that group get an in-band INTERNAL error, the other groups their maps.
    _, _, handler = model_and_handler

    def refuse_blank(module, args):
        if (args[0].flatten(1).std(dim=1) == 0).any():
            raise RuntimeError("blank input in the batch")

    blank = np.zeros_like(random_image(80))
    items = [
        internal(data=png(blank), methods=["grad_cam"]),
        internal(data=png(random_image(81)), methods=["swag_i"], n_segments=12),
        internal(data=png(random_image(82)), methods=["grad_cam"]),
        {"data": png(random_image(83))},
    ]
    hook = handler.explainer.model.register_forward_pre_hook(refuse_blank)
    try:
        answers = handle(handler, items)
    finally:
        hook.remove()
    assert len(answers) == 4
    failed = [handler_pb2.HandlerResponse.FromString(answers[i]) for i in (0, 2)]
    for answer in failed:
        assert answer.WhichOneof("result") == "error" and answer.error.code == 13  # INTERNAL
        assert answer.error.message == "RuntimeError: blank input in the batch"
    swag = handler_pb2.HandlerResponse.FromString(answers[1])
    assert swag.WhichOneof("result") == "response" and swag.response.explanations[0].method == "swag_i"
    assert sorted(json.loads(answers[3])["explanations"]) == ["jitter_cam", "swag_i_g"]
