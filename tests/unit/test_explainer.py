import copy
import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from skimage import data

from explainserve.cam import grad_cam
from explainserve.explainer import SLIC_DEFAULTS, VIDEO_METHODS, ExplainOptions, Explainer, spare_core
from explainserve.grad_amap import grad_amap
from explainserve.jitter_cam import jitter_cam
from explainserve.probe import probe
from explainserve.surprise import FilterRegion, filter_regions, suppress_surprise
from explainserve.superpixels import gradient_slic
from explainserve.swag import PIXEL_SOURCES, pixel_scores

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def image_explainer():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return Explainer(model, kind="image", input_size=(64, 64), mean=MEAN, std=STD, class_names=list("abcdefghij"))


@pytest.fixture(scope="module")
def photos():
    return [data.astronaut(), data.coffee()]


def test_one_call_returns_every_image_method_consistent_with_the_library(image_explainer, photos):
    methods = ["swag_i", "swag_g", "swag_i_g", "grad_cam", "jitter_cam"]
    options = ExplainOptions(n_segments=50, top_k=3)
    called = time.perf_counter()
    results = image_explainer.explain(photos, methods, options, labels=[4, None])
    elapsed = time.perf_counter() - called
    prepared = image_explainer.prepare(photos)
    rgb, inputs = prepared.rgb, prepared.inputs
    reference = probe(image_explainer.model, inputs)
    expected_cam = grad_cam(reference.activations, reference.activation_gradients, (64, 64)).numpy()
    expected_alpha = grad_amap(reference.activations, reference.activation_gradients).numpy()
    for b, result in enumerate(results):
        assert set(result.maps) == set(methods)
        for method, explanation in result.maps.items():
            assert explanation.heatmap.shape == (64, 64) and explanation.heatmap.dtype == np.float32
            assert (explanation.segments is not None) == method.startswith("swag")
        assert result.predicted == int(reference.predicted[b]) == result.target
        assert list(result.classes) == reference.probabilities[b].topk(3).indices.tolist()
        np.testing.assert_allclose(result.scores, reference.probabilities[b].topk(3).values.numpy(), rtol=1e-5)
        np.testing.assert_allclose(result.maps["grad_cam"].heatmap, expected_cam[b], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.alpha, expected_alpha[b], rtol=1e-4, atol=1e-8)
        image = rgb[b].permute(1, 2, 0).numpy().astype(np.float64)
        colour = gradient_slic(image, None, variant="i", n_segments=50, wc=SLIC_DEFAULTS["image"]["wc"],
                               wg=SLIC_DEFAULTS["image"]["wg"])
        np.testing.assert_array_equal(result.maps["swag_i"].segments, colour)
        assert set(result.timings) == {"preprocess", "network", "superpixels", "jitter_cam", "total"}
        # seconds of this call: the steps run one after the other, within the total
        assert all(0 <= seconds <= elapsed for seconds in result.timings.values()), result.timings
        steps = sum(seconds for step, seconds in result.timings.items() if step != "total")
        assert steps <= result.timings["total"], result.timings
    assert results[0].label_alpha is not None and results[1].label_alpha is None
    assert not np.allclose(results[0].label_alpha, results[0].alpha) or results[0].target == 4


def test_prepare_resizes_and_normalises_once(image_explainer, photos):
    prepared = image_explainer.prepare(photos)
    assert prepared.rgb.shape == (2, 3, 64, 64) and image_explainer.prepare(prepared) is prepared
    # mean 0.5, std 0.25 for every channel: inputs = 4 rgb - 2, by hand
    np.testing.assert_allclose(prepared.inputs.numpy(), 4 * prepared.rgb.numpy() - 2, rtol=0, atol=1e-6)
    assert prepared.images.shape == (2, 64, 64, 3) and prepared.images.dtype == np.float64
    np.testing.assert_array_equal(prepared.images[1], prepared.rgb[1].permute(1, 2, 0).numpy())
    taken = prepared.take([1, 1, 0])
    assert torch.equal(taken.inputs[2], prepared.inputs[0]) and torch.equal(taken.rgb[0], prepared.rgb[1])


def test_filter_scores_are_the_served_alpha(image_explainer, photos):
    # The store is built from filter_scores and Explain serves explain()'s alpha: they must agree,
    # with and without targets and labels, whatever the methods run beside.
    served = image_explainer.explain(photos, ["swag_g", "grad_cam"], targets=[None, 7], labels=[2, None])
    scores = image_explainer.filter_scores(photos, targets=[None, 7], labels=[2, None])
    assert scores.target.tolist() == [served[0].predicted, 7] == [r.target for r in served]
    assert scores.predicted.tolist() == [r.predicted for r in served] and scores.logits.shape == (2, 10)
    for b, result in enumerate(served):
        np.testing.assert_allclose(scores.alpha[b], result.alpha, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(scores.label_alpha[0], served[0].label_alpha, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"target: class id must be in \[0, 9\], got 10"):
        image_explainer.filter_scores(photos, targets=[10, None])
    with pytest.raises(ValueError, match=r"^label: class id must be in \[0, 9\], got 10$"):
        image_explainer.filter_scores(photos, labels=[None, 10])
    # label_alpha only when labels are given, for every sample when all are
    assert image_explainer.filter_scores(photos).label_alpha is None
    labelled = image_explainer.explain(photos, [], labels=[3, 5])
    expected = image_explainer.filter_scores(photos, targets=[3, 5]).alpha
    for b, result in enumerate(labelled):
        np.testing.assert_allclose(result.label_alpha, expected[b], rtol=1e-5, atol=1e-8)


def test_close_stops_the_superpixel_threads(photos):
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    with Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc")) as explainer:
        explainer.explain(photos[:1], ["swag_i_g"])
    with pytest.raises(RuntimeError, match="shutdown"):
        explainer.explain(photos[:1], ["swag_i_g"])


def test_close_waits_for_running_superpixel_jobs_and_cancels_the_queued_ones():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    explainer = Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc"))
    started, release = threading.Semaphore(0), threading.Event()

    def job():
        started.release()
        return release.wait(timeout=30)

    pool = explainer._superpixel_pool
    running = [pool.submit(job) for _ in range(2)]  # one per thread of the pool
    assert all(started.acquire(timeout=30) for _ in running)
    queued = pool.submit(job)
    threading.Timer(0.2, release.set).start()
    explainer.close()
    assert [future.result(timeout=0) for future in running] == [True, True]
    assert queued.cancelled()


def test_the_callers_model_keeps_its_training_flags(photos):
    # The Explainer runs every pass in eval mode (probe's promise) without switching the caller's
    # model to eval for good; its running statistics are not touched either.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc"))
    (result,) = explainer.explain(photos[:1], ["grad_cam", "jitter_cam"])
    assert all(module.training for module in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    evaluated = copy.deepcopy(model).eval()
    (reference,) = Explainer(evaluated, kind="image", input_size=(32, 32), mean=MEAN, std=STD,
                             class_names=list("abc")).explain(photos[:1], ["grad_cam", "jitter_cam"])
    for method in ("grad_cam", "jitter_cam"):
        np.testing.assert_allclose(result.maps[method].heatmap, reference.maps[method].heatmap, rtol=1e-5, atol=1e-7)


def test_options_are_frozen_and_hashable():
    options = ExplainOptions(n_segments=40)
    with pytest.raises(AttributeError):
        options.n_segments = 50
    assert {options: 1}[ExplainOptions(n_segments=40)] == 1


def test_default_methods_and_prediction_only(image_explainer, photos):
    assert set(image_explainer.explain(photos[:1])[0].maps) == {"swag_i_g", "jitter_cam"}
    result = image_explainer.explain(photos[:1], [])[0]
    assert result.maps == {} and result.alpha.shape == (512,)


def test_requested_target_is_explained(image_explainer, photos):
    result = image_explainer.explain(photos[:1], ["grad_cam"], targets=[7])[0]
    assert result.target == 7


def test_video_explainer_returns_supervoxel_maps():
    model = torchvision.models.video.r3d_18(weights=None, num_classes=4)
    explainer = Explainer(model, kind="video", input_size=(8, 32, 32), mean=MEAN, std=STD, class_names=list("abcd"))
    assert explainer.methods == VIDEO_METHODS
    frame = data.astronaut()[::8, ::8]
    clip = np.stack([np.roll(frame, 3 * t, axis=1) for t in range(8)])
    result = explainer.explain([clip], ["swag_v_i", "swag_v_g", "swag_v_i_g", "grad_cam"],
                               ExplainOptions(n_segments=30))[0]
    for method in ("swag_v_i", "swag_v_g", "swag_v_i_g", "grad_cam"):
        assert result.maps[method].heatmap.shape == (8, 32, 32)
    assert result.maps["swag_v_i"].segments.max() >= 2
    # unset, n_segments is 120 * (8 * 32 * 32) / (16 * 112 * 112) = 5, raised to the floor of 16
    assert explainer.limits.default_n_segments == 16
    default = explainer.explain([clip], ["swag_v_i"])[0].maps["swag_v_i"]
    assert 8 <= len(default.segment_scores) <= 32
    with pytest.raises(ValueError, match=r"samples\[0\]: expected a clip of 8 frames, got 5$"):
        explainer.explain([clip[:5]], ["grad_cam"])
    with pytest.raises(ValueError, match=r"samples\[0\]: expected an RGB video of shape \(T, H, W, 3\), got \(8, 64, 64\)"):
        explainer.explain([clip[..., 0]], ["grad_cam"])
    with pytest.raises(ValueError, match="methods"):
        explainer.explain([clip], ["jitter_cam"])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda e, p: e.explain(p, ["lime"]), "methods: \\['lime'\\] not available"),
        (lambda e, p: e.explain(p, ["swag_i"], ExplainOptions(n_segments=0)), r"n_segments: must be in \[1, 1024\]"),
        (lambda e, p: e.explain(p, ["swag_i"], ExplainOptions(n_segments=10**6)), "n_segments"),
        (lambda e, p: e.explain(p, ["jitter_cam"], ExplainOptions(jitter_d=-1)), r"jitter_d: must be in \[0, 8\]"),
        (lambda e, p: e.explain(p[:1], ["grad_cam"], targets=[10]), r"target: class id must be in \[0, 9\]"),
        (lambda e, p: e.explain(p[:1], ["grad_cam"], ExplainOptions(top_k=0)), "top_k"),
        (lambda e, p: e.explain([p[0].astype(np.float32)], ["grad_cam"]), "expected uint8"),
        (lambda e, p: e.explain([p[0][..., 0]], ["grad_cam"]),
         r"samples\[0\]: expected an RGB image of shape \(H, W, 3\), got \(512, 512\)"),
        (lambda e, p: e.explain([np.dstack([p[0], p[0][..., :1]])], ["grad_cam"]),
         r"samples\[0\]: expected an RGB image of shape \(H, W, 3\), got \(512, 512, 4\)"),
        (lambda e, p: e.explain([], ["grad_cam"]), "^samples: the batch is empty; expected at least one sample$"),
        (lambda e, p: e.explain(p, ["grad_cam"], labels=[None, 10]), r"^label: class id must be in \[0, 9\], got 10$"),
        (lambda e, p: e.explain(p, ["grad_cam"], targets=[1]), r"targets: expected one entry per sample \(2\), got 1"),
        (lambda e, p: e.explain(p, ["grad_cam"], labels=[1, 2, 3]), r"labels: expected one entry per sample \(2\), got 3"),
    ],
)
def test_bad_requests_raise_value_errors(image_explainer, photos, call, message):
    with pytest.raises(ValueError, match=message):
        call(image_explainer, photos)


def test_check_request_names_each_bad_parameter(image_explainer):
    # The handler checks a request with it before the batch is formed.
    check = image_explainer.check_request
    check(["swag_i", "jitter_cam"], ExplainOptions(n_segments=40, wc=5.0, wg=5.0, jitter_d=1, top_k=3), 9, 0)
    for call, message in (
        (lambda: check(["grad_cam"], target=10), r"^target: class id must be in \[0, 9\], got 10$"),
        (lambda: check(["grad_cam"], label=-1), r"^label: class id must be in \[0, 9\], got -1$"),
        (lambda: check(["grad_cam"], ExplainOptions(top_k=0)), r"^top_k: must be in \[1, "),
        (lambda: check(["swag_i"], ExplainOptions(wc=0.0)), r"^wc: expected a weight in \(0, "),
        (lambda: check(["swag_i"], ExplainOptions(wg=-1.0)), r"^wg: expected a weight in \(0, "),
        (lambda: check(["swag_i"], ExplainOptions(n_segments=0)), r"^n_segments: must be in \[1, "),
        (lambda: check(["jitter_cam"], ExplainOptions(jitter_d=9)), r"^jitter_d: must be in \[0, 8\]"),
        (lambda: check(["lime"]), r"methods: \['lime'\] not available"),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_class_names_must_match_the_model():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(ValueError, match="class_names: the model has 10 outputs but 3"):
        Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc"))


def test_every_pixel_score_source_runs_and_guided_grad_cam_is_a_product():
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    result = probe(model, x, vanilla_gradient=True)
    maps = {source: pixel_scores(result, x, source) for source in PIXEL_SOURCES}
    for source, scores in maps.items():
        assert scores.shape == (2, 64, 64) and np.isfinite(scores).all(), source
    np.testing.assert_allclose(maps["guided_grad_cam"], maps["guided"] * maps["grad_cam"], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(maps["vanilla"], result.vanilla_gradient.abs().amax(1).numpy())
    np.testing.assert_allclose(maps["input_x_gradient"], (x * result.vanilla_gradient).abs().amax(1).numpy())
    without_vanilla = probe(model, x)
    with pytest.raises(ValueError, match="vanilla_gradient=True"):
        pixel_scores(without_vanilla, x, "vanilla")
    with pytest.raises(ValueError, match="source"):
        pixel_scores(without_vanilla, x, "sobel")


def test_default_superpixel_count_scales_with_the_input_area():
    # The served default keeps the thesis's mean superpixel area (300 at 224 x 224, about 167 px):
    # 24 at 64 x 64 and 75 at 112 x 112, the floor of 16 at 32 x 32; a constant 300 would give
    # superpixels of 14 px at 64 px and be refused outright at 32 px (at most 256).
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    photo = data.coffee()
    for side, expected in ((32, 16), (64, 24), (112, 75)):
        with Explainer(model, kind="image", input_size=(side, side), mean=MEAN, std=STD, class_names=list("abc")) as explainer:
            assert explainer.limits.default_n_segments == expected
            assert explainer.slic_options(ExplainOptions())["n_segments"] == expected
            # SLIC's full 10 iterations for these few superpixels; fewer for a request of many
            assert explainer.slic_options(ExplainOptions())["max_num_iter"] == 10
            assert explainer.slic_options(ExplainOptions(n_segments=256))["max_num_iter"] == 10
            if side >= 112:
                assert explainer.slic_options(ExplainOptions(n_segments=300))["max_num_iter"] == 6
            (result,) = explainer.explain([photo], ["swag_i"])
            found = len(result.maps["swag_i"].segment_scores)
            assert expected // 2 <= found <= 2 * expected, (side, found)
            # the request's n_segments overrides the default
            (finer,) = explainer.explain([photo], ["swag_i"], ExplainOptions(n_segments=4 * expected))
            assert len(finer.maps["swag_i"].segment_scores) > 2 * expected
    with pytest.raises(ValueError, match=r"n_segments: must be in \[1, 256\] for input size \(32, 32\), got 300"):
        Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD,
                  class_names=list("abc")).explain([photo], ["grad_cam"], ExplainOptions(n_segments=300))


def test_each_map_is_the_library_function_applied_to_that_sample_alone_for_a_requested_target(image_explainer, photos):
    # A batch must not leak between samples, and the requested class (here never the predicted
    # one) drives every map: each is recomputed from the sample alone, with plain formulas where
    # the library's step is a one-liner.
    model = image_explainer.model
    methods = ["swag_i", "swag_g", "swag_i_g", "grad_cam", "jitter_cam"]
    slic = {"n_segments": 40, "wc": 6.0, "wg": 14.0}
    prepared = image_explainer.prepare(photos)
    rgb, inputs = prepared.rgb, prepared.inputs
    predicted = probe(model, inputs, input_gradient=False).predicted.tolist()
    # Per sample, the other class with the strongest Grad-CAM, so that no map is blank.
    strength = torch.stack([grad_cam(r.activations, r.activation_gradients, (2, 2)).sum(dim=(1, 2))
                            for r in (probe(model, inputs, target=c, input_gradient=False) for c in range(10))], dim=1)
    strength[torch.arange(2), predicted] = -1
    targets = strength.argmax(dim=1).tolist()
    results = image_explainer.explain(photos, methods, ExplainOptions(**slic, jitter_d=1), targets=targets)
    for b, result in enumerate(results):
        assert result.target == targets[b] != result.predicted == predicted[b]
        alone = probe(model, inputs[b : b + 1], target=[targets[b]])
        weights = alone.activation_gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.nn.functional.interpolate((weights * alone.activations).sum(1, keepdim=True).clamp(min=0),
                                              size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(result.maps["grad_cam"].heatmap, cam.numpy(), rtol=1e-4, atol=1e-6)
        jitter = jitter_cam(model, inputs[b : b + 1], torch.tensor([targets[b]]), cam_size=(2, 2), d=1)[0]
        np.testing.assert_allclose(result.maps["jitter_cam"].heatmap, jitter.numpy(), rtol=1e-4, atol=1e-6)
        of_predicted = jitter_cam(model, inputs[b : b + 1], torch.tensor([predicted[b]]), cam_size=(2, 2), d=1)[0]
        assert jitter.max() > 0 and not torch.allclose(jitter, of_predicted, atol=1e-4)

        guided = alone.input_gradient[0].abs().amax(0).numpy()  # M: max over channels of |guided gradient|
        image = rgb[b].permute(1, 2, 0).numpy().astype(np.float64)
        for method, variant in (("swag_i", "i"), ("swag_g", "g"), ("swag_i_g", "i_g")):
            segments = gradient_slic(image, None if variant == "i" else guided, variant=variant, **slic)
            np.testing.assert_array_equal(result.maps[method].segments, segments, err_msg=method)
            means = np.array([guided[segments == label].mean() for label in range(segments.max() + 1)])
            np.testing.assert_allclose(result.maps[method].segment_scores, means, rtol=1e-4, err_msg=method)
            np.testing.assert_allclose(result.maps[method].heatmap, means[segments], rtol=1e-4, err_msg=method)


def test_kind_and_input_size_are_checked_before_the_model_runs():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    common = {"mean": MEAN, "std": STD, "class_names": list("abc")}
    with pytest.raises(ValueError, match=r"kind: expected 'image' or 'video', got 'audio'"):
        Explainer(model, kind="audio", input_size=(32, 32), **common)
    for kind, size in (("image", (8, 32, 32)), ("image", (0, 32)), ("image", (32, -1)), ("video", (32, 32)),
                       ("video", (8, 0, 32))):
        spatial = 2 if kind == "image" else 3
        expected = rf"input_size: expected {spatial} positive ints for kind '{kind}', got \({', '.join(map(str, size))}\)"
        with pytest.raises(ValueError, match=expected):
            Explainer(model, kind=kind, input_size=size, **common)
    # One pixel is a positive size: at 1 x 32, ResNet-18's layer4 is 1 x 1 (one position, a summary), so
    # the target is layer3's 1 x 2 map.
    explainer = Explainer(model, kind="image", input_size=(1, 32), **common)
    assert (explainer.layer, explainer.cam_size) == ("layer3", (1, 2))


def test_an_input_size_the_model_cannot_run_on_is_a_value_error_naming_it():
    # A fixed 8 x 8 pooling window on a 4 x 4 map: torch's RuntimeError, reported against input_size.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^input_size=\(4, 4\): the model cannot run on an input of shape "
                                         r"\(1, 3, 4, 4\) \(RuntimeError: .*\); pass the input size it was trained at$"):
        Explainer(model, kind="image", input_size=(4, 4), mean=MEAN, std=STD, class_names=list("ab"))
    assert Explainer(model, kind="image", input_size=(8, 8), mean=MEAN, std=STD, class_names=list("ab")).layer == "1"


def test_each_channel_is_normalised_with_its_own_mean_and_std_in_float32(photos):
    # Given as float64 arrays (as read from a model's configuration), still float32 inputs.
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.25, 0.5])
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    explainer = Explainer(model, kind="image", input_size=(32, 32), mean=mean, std=std, class_names=list("abc"),
                          device="cpu")
    assert explainer.device == torch.device("cpu")
    prepared = explainer.prepare(photos[:1])
    assert prepared.inputs.dtype == torch.float32
    for channel in range(3):
        by_hand = (prepared.rgb[:, channel].numpy() - mean[channel]) / std[channel]
        np.testing.assert_allclose(prepared.inputs[:, channel].numpy(), by_hand, rtol=1e-5, atol=1e-6)


def grey_cnn(dims: int = 2) -> torch.nn.Module:
    conv, pool = (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d) if dims == 2 else (torch.nn.Conv3d, torch.nn.AdaptiveAvgPool3d)
    return torch.nn.Sequential(conv(1, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, stride=2, padding=1),
                               torch.nn.ReLU(), pool(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


def test_a_greyscale_model_is_given_the_luma_pillow_computes_and_shown_it(photos):
    from PIL import Image

    side = photos[0].shape[0]  # the astronaut is 512 x 512: no resize, so Pillow's "L" is the reference
    explainer = Explainer(grey_cnn(), kind="image", input_size=(side, side), mean=[0.2], std=[0.4],
                          class_names=list("abc"))
    assert explainer.channels == 1 and explainer.layer == "3"
    prepared = explainer.prepare(photos[:1])
    assert prepared.inputs.shape == (1, 1, side, side) and prepared.rgb.shape == (1, 3, side, side)
    pillow = np.asarray(Image.fromarray(photos[0]).convert("L"), dtype=np.float64) / 255
    grey = prepared.rgb[0, 0].numpy()
    assert np.abs(grey - pillow).max() <= 0.5 / 255 + 1e-6  # Pillow rounds to whole levels
    for channel in (1, 2):  # SLIC and the pictures see what the model sees
        np.testing.assert_array_equal(prepared.rgb[0, channel].numpy(), grey)
    np.testing.assert_allclose(prepared.inputs[0, 0].numpy(), (grey - 0.2) / 0.4, rtol=1e-5, atol=1e-6)
    (result,) = explainer.explain(photos[:1], ["swag_i_g", "grad_cam"])
    reference = probe(explainer.model, prepared.inputs, input_gradient=True)
    assert reference.input_gradient.shape == (1, 1, side, side)
    np.testing.assert_allclose(result.maps["grad_cam"].heatmap,
                               grad_cam(reference.activations, reference.activation_gradients, (side, side))[0].numpy(),
                               rtol=1e-4, atol=1e-6)
    assert result.maps["swag_i_g"].heatmap.shape == (side, side) and np.ptp(result.maps["swag_i_g"].heatmap) > 0
    clip = np.stack([photos[0][:64, :64]] * 4)
    video = Explainer(grey_cnn(3), kind="video", input_size=(4, 32, 32), mean=[0.5], std=[0.5], class_names=list("abc"))
    inputs = video.prepare([clip]).inputs
    assert inputs.shape == (1, 1, 4, 32, 32) and torch.equal(inputs[:, :, 0], inputs[:, :, 3])


def test_normalisation_must_match_the_models_channels():
    common = {"kind": "image", "input_size": (16, 16), "class_names": list("abc")}
    rgb = torchvision.models.resnet18(weights=None, num_classes=3)
    cases = [
        (grey_cnn(), [0.5] * 3, [0.5] * 3, r"^mean, std: the model's first convolution takes 1 channel\(s\) "
                                           r"\(greyscale\) but 3 value\(s\) each were given; pass 1 each$"),
        (rgb, [0.5], [0.5], r"takes 3 channel\(s\) \(RGB\) but 1 value\(s\) each were given; pass 3 each$"),
        (rgb, [0.5] * 2, [0.5] * 2, r"^mean, std: expected 3 values each \(RGB\), or 1 each for a greyscale model, "
                                    r"got 2 and 2$"),
        (rgb, [0.5] * 3, [0.5], r"got 3 and 1$"),
        (rgb, [0.5] * 3, [0.5, 0.0, 0.5], r"^mean, std: expected finite values and positive stds"),
        (rgb, [0.5, float("nan"), 0.5], [0.5] * 3, r"^mean, std: expected finite values and positive stds"),
        (torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), [0.5] * 3, [0.5] * 3,
         r"^mean, std: the model's first convolution takes 4 channels; only RGB \(3\) and greyscale \(1\)"),
    ]
    for model, mean, std, message in cases:
        with pytest.raises(ValueError, match=message):
            Explainer(model, mean=mean, std=std, **common)


def test_a_chosen_target_layer_is_the_one_explained(photos):
    # layer2, not the default at 32 px (layer3: layer4 is 1 x 1 there)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    explainer = Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc"),
                          layer="layer2")
    assert explainer.layer == "layer2" and explainer.cam_size == (4, 4) and explainer.num_filters == 128
    (result,) = explainer.explain(photos[:1], ["grad_cam"])
    reference = probe(model, explainer.prepare(photos[:1]).inputs, layer="layer2")
    np.testing.assert_allclose(result.alpha, grad_amap(reference.activations, reference.activation_gradients)[0].numpy(),
                               rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(result.maps["grad_cam"].heatmap,
                               grad_cam(reference.activations, reference.activation_gradients, (32, 32))[0].numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(explainer.filter_scores(photos[:1]).alpha[0], result.alpha, rtol=1e-5, atol=1e-8)
    (jitter,) = explainer.explain(photos[:1], ["jitter_cam"])
    inputs = explainer.prepare(photos[:1]).inputs
    np.testing.assert_allclose(jitter.maps["jitter_cam"].heatmap,
                               jitter_cam(model, inputs, reference.predicted, cam_size=(4, 4), layer="layer2")[0].numpy(),
                               rtol=1e-4, atol=1e-6)
    other = (int(reference.predicted[0]) + 1) % 3
    (region,) = explainer.filter_regions(photos[:1], [100], targets=[other], n_segments=20)
    images = explainer.prepare(photos[:1]).rgb.movedim(1, -1).numpy()
    (expected,) = filter_regions(model, inputs, [100], target=[other], images=images, layer="layer2", n_segments=20)
    (of_predicted,) = filter_regions(model, inputs, [100], images=images, layer="layer2", n_segments=20)
    assert region.target == other and not np.allclose(expected.heatmap, of_predicted.heatmap)
    assert region.heatmap.max() > 0
    np.testing.assert_array_equal(region.segments, expected.segments)
    np.testing.assert_allclose(region.heatmap, expected.heatmap, rtol=1e-4, atol=1e-8)


def test_samples_are_resized_keeping_their_values_in_0_1(image_explainer):
    # Black and white halves, 128 px to 64 px: away from the edge each half keeps its value (the
    # antialiasing filter spans 2 input pixels either side); a flat grey stays that grey.
    halves = np.zeros((128, 128, 3), np.uint8)
    halves[:, 64:] = 255
    grey = np.full((96, 80, 3), 51, np.uint8)
    rgb = image_explainer.prepare([halves, grey]).rgb
    assert rgb.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(rgb[0, :, :, :30], 0, atol=1e-6)
    np.testing.assert_allclose(rgb[0, :, :, 34:], 1, atol=1e-6)
    np.testing.assert_allclose(rgb[1], 51 / 255, atol=1e-6)
    assert rgb.min() >= 0 and rgb.max() <= 1
    # Stripes 2 px wide (0, 0, 1, 1, ...), 128 px to 64 px: the antialiased resize weighs input
    # columns 2j-1 .. 2j+2 by 1/8, 3/8, 3/8, 1/8 (a triangle twice a pixel wide, pixel centres
    # aligned), so away from the border the columns read 3/4, 1/4, ... (plain bilinear: 1, 0).
    stripes = np.zeros((128, 128, 3), np.uint8)
    stripes[:, 2::4] = stripes[:, 3::4] = 255
    resized = image_explainer.prepare([stripes]).rgb[0]
    np.testing.assert_allclose(resized[:, :, 1:63], np.tile([0.75, 0.25], 31)[None, None].repeat(64, 1).repeat(3, 0),
                               atol=1e-6)


def test_spare_core_counts_the_cores_this_process_may_run_on():
    # Colour superpixels start beside the network pass only when torch leaves one of this
    # process's cores idle; cores outside its affinity are not its own.
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    try:
        torch.set_num_threads(len(cores))
        assert not spare_core()
        if len(cores) > 1:
            torch.set_num_threads(len(cores) - 1)
            assert spare_core()
            os.sched_setaffinity(0, {min(cores)})
            torch.set_num_threads(1)
            assert not spare_core()
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def test_colour_superpixels_are_the_same_started_beside_the_network_pass_or_after_it(photos):
    # With a core to spare SWAG_I's SLIC starts before the network pass, else after it: the same
    # superpixels and maps. The pass runs on one thread less with a spare core, and a convolution's
    # sums may be ordered differently on another thread count (last-bit differences on some CPUs).
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    maps = {}
    try:
        with Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc")) as explainer:
            for spare in (False, True)[: 1 + (cores > 1)]:
                torch.set_num_threads(cores - 1 if spare else cores)
                assert spare_core() == spare
                (maps[spare],) = explainer.explain(photos[:1], ["swag_i", "swag_i_g"], ExplainOptions(n_segments=16))
    finally:
        torch.set_num_threads(threads)
    image = explainer.prepare(photos[:1]).images[0]
    for result in maps.values():
        np.testing.assert_array_equal(result.maps["swag_i"].segments,
                                      gradient_slic(image, None, variant="i", **explainer.slic_options(ExplainOptions(n_segments=16))))
        np.testing.assert_allclose(result.maps["swag_i"].heatmap, maps[False].maps["swag_i"].heatmap, rtol=1e-5, atol=0)


def test_suppression_stops_after_the_steps_asked_for(photos):
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    explainer = Explainer(model, kind="image", input_size=(32, 32), mean=MEAN, std=STD, class_names=list("abc"))
    # Segment 0 is one pixel, deleted first; segment 1 is the rest of the image.
    segments = np.ones((32, 32), np.int32)
    segments[0, 0] = 0
    scores = np.array([1.0, 0.0], np.float32)
    region = FilterRegion(filter=0, target=0, heatmap=scores[segments], pixel_scores=scores[segments], segments=segments,
                          segment_scores=scores, top_segment=0, alpha=1.0)
    inputs = explainer.prepare(photos[:1]).inputs
    (one,) = explainer.suppress_surprise(photos[:1], [region], steps=1)
    assert one.deleted_segments.tolist() == [0]
    (by_library,) = suppress_surprise(model, inputs, [region], steps=2)
    (two,) = explainer.suppress_surprise(photos[:1], [region], steps=2)
    assert two.deleted_segments.tolist() == by_library.deleted_segments.tolist() == [0, 1]


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_a_multi_label_model_is_scored_with_each_logits_sigmoid_and_explained_as_before(photos, architecture):
    # Independent sigmoid outputs: a softmax would make the labels compete (scores summing to 1).
    # Only the scores change: the class explained is the arg-max logit either way.
    torch.manual_seed(3)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=5).eval()
    options = dict(kind="image", input_size=(64, 64), mean=MEAN, std=STD, class_names=list("abcde"))
    single, multi = Explainer(model, **options), Explainer(model, **options, multi_label=True)
    methods = ["swag_i_g", "grad_cam"]
    plain = single.explain(photos[:2], methods, ExplainOptions(top_k=5))
    labelled = multi.explain(photos[:2], methods, ExplainOptions(top_k=5))
    with torch.no_grad():
        logits = model(single.prepare(photos[:2]).inputs).double()
    for b, (one, other) in enumerate(zip(plain, labelled)):
        np.testing.assert_array_equal(other.classes, np.argsort(-logits[b].numpy(), kind="stable"))
        np.testing.assert_array_equal(one.classes, other.classes)
        np.testing.assert_allclose(other.scores, torch.sigmoid(logits[b])[other.classes].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(one.scores, torch.softmax(logits[b], 0)[one.classes].numpy(), rtol=1e-5, atol=1e-7)
        assert other.predicted == one.predicted == int(logits[b].argmax())
        np.testing.assert_array_equal(other.alpha, one.alpha)
        for method in methods:
            np.testing.assert_array_equal(other.maps[method].heatmap, one.maps[method].heatmap)
    segments = np.zeros((64, 64), np.int32)
    segments[:, 32:] = 1
    scores = np.array([1.0, 0.0], np.float32)
    region = FilterRegion(filter=0, target=0, heatmap=scores[segments], pixel_scores=scores[segments], segments=segments,
                          segment_scores=scores, top_segment=0, alpha=1.0)
    (suppressed,) = multi.suppress_surprise(photos[:1], [region], steps=2)
    deleted = single.prepare(photos[:1]).inputs.clone()
    deleted[..., :32] = 0
    with torch.no_grad():
        after = torch.sigmoid(model(deleted).double())[0, int(logits[0].argmax())]
    np.testing.assert_allclose(suppressed.probabilities[0], after.item(), rtol=1e-5)
    with pytest.raises(ValueError, match="^multi_label: expected True or False, got 'yes'"):
        Explainer(model, **options, multi_label="yes")


def test_a_read_only_sample_is_explained_without_a_warning_and_as_a_writable_one(image_explainer, photos):
    # np.asarray(PIL.Image.open(...)) gives a read-only array: torch.from_numpy would warn about it.
    frozen = photos[1].copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = image_explainer.prepare([frozen, photos[1][:, ::-1]])  # and a negative stride
    expected = image_explainer.prepare([photos[1], np.ascontiguousarray(photos[1][:, ::-1])])
    torch.testing.assert_close(prepared.inputs, expected.inputs, rtol=0, atol=0)


def hooked_mean_activations(explainer: Explainer, inputs: torch.Tensor, axes: tuple) -> np.ndarray:
    """The target layer's output averaged over ``axes``, from a plain eval forward with a hook of
    its own: what FilterScores.features must equal, computed without the probe pass."""
    captured = []
    handle = explainer.model.get_submodule(explainer.layer).register_forward_hook(
        lambda _module, _args, output: captured.append(output.detach().clone()))
    try:
        with torch.no_grad():
            explainer.model.eval()(inputs)
    finally:
        handle.remove()
    return captured[0].mean(dim=axes).numpy()


def test_features_are_the_target_layers_activations_averaged_over_positions(image_explainer, photos):
    prepared = image_explainer.prepare(photos)
    expected = hooked_mean_activations(image_explainer, prepared.inputs, (2, 3))
    assert expected.shape == (2, image_explainer.num_filters) == (2, 512)
    scores = image_explainer.filter_scores(prepared, targets=[None, 7], labels=[2, None])
    assert scores.features.dtype == np.float32 and scores.features.shape == expected.shape
    np.testing.assert_allclose(scores.features, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the two photos differ: a swapped row would fail
    # Explain serves the same rows from the one probe pass that gives alpha, whatever it runs beside.
    for b, result in enumerate(image_explainer.explain(prepared, ["swag_g", "grad_cam"])):
        np.testing.assert_allclose(result.features, expected[b], rtol=1e-5, atol=1e-6)


def test_video_features_average_over_time_and_space():
    torch.manual_seed(1)
    model = torchvision.models.video.r3d_18(weights=None, num_classes=4)
    explainer = Explainer(model, kind="video", input_size=(8, 32, 32), mean=MEAN, std=STD, class_names=list("abcd"))
    frame = data.astronaut()[::8, ::8]
    clips = [np.stack([np.roll(frame, s * t, axis=1) for t in range(8)]) for s in (3, 11)]
    prepared = explainer.prepare(clips)
    expected = hooked_mean_activations(explainer, prepared.inputs, (2, 3, 4))
    assert expected.shape == (2, 512) and len(explainer.cam_size) == 3  # (t, h, w) positions
    np.testing.assert_allclose(explainer.filter_scores(prepared).features, expected, rtol=1e-5, atol=1e-6)
    for b, result in enumerate(explainer.explain(prepared, ["grad_cam"])):
        np.testing.assert_allclose(result.features, expected[b], rtol=1e-5, atol=1e-6)
