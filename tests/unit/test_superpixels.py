"""The SLIC call minimises the thesis distance (eq. 3.5): checked against a numpy reference."""

import numpy as np
import pytest
from skimage import data, measure, transform
from skimage.color import rgb2lab
from skimage.util import regular_grid

from explainserve.superpixels import MAX_SEGMENTS, check_superpixel_parameters, gradient_slic, rescale_scores
from explainserve.swag import segment_means, swag


def thesis_terms(image_rgb, scores, variant):
    """The colour and score parts of the thesis's description vector C = [l, a, b, x, y, g].

    Written from the text, not from ``slic_features``: CIELAB colour (eq. 3.2) and the pixel
    scores M scaled to [0, 100] "to match the range of LAB values" (before eq. 3.5). A variant
    without a term gets an empty one.
    """
    shape = (np.shape(image_rgb)[:-1] if image_rgb is not None else np.shape(scores))
    lab = rgb2lab(np.asarray(image_rgb, dtype=np.float64)) if variant in ("i", "i_g") else np.zeros(shape + (0,))
    if variant in ("g", "i_g"):
        m = np.asarray(scores, dtype=np.float64)
        span = m.max() - m.min()  # constant scores carry no information: all zero
        g = (100.0 * (m - m.min()) / span if span > 0 else np.zeros_like(m))[..., None]
    else:
        g = np.zeros(shape + (0,))
    return lab, g


def reference_slic(image_rgb, scores, *, n_segments, wc, wg, variant, spacing=(1.0, 1.0, 1.0), max_num_iter=10):
    """SLIC k-means written from the thesis: D'^2 = (dc/wc)^2 + (ds/ws)^2 + (dg/wg)^2 (eq. 3.5).

    Each term is its own distance (dc over CIELAB, ds over position, dg over the rescaled
    scores), weighted as the equation says; "i" drops dg (eq. 3.4), "g" drops dc (eq. 3.6).
    Seeds on skimage's regular grid, search windows of 2S around each centre, centres
    initialised with zero colour and score, as scikit-image does; no connectivity enforcement.
    """
    lab, g = thesis_terms(image_rgb, scores, variant)
    is_image = lab.ndim == 3
    if is_image:
        lab, g = lab[None], g[None]
    depth, height, width = lab.shape[:3]
    slices = regular_grid((depth, height, width), n_segments)
    steps = [int(s.step) if s.step is not None else 1 for s in slices]
    ws = float(max(float(s.step) if s.step is not None else 1.0 for s in slices))
    grid = np.mgrid[:depth, :height, :width]
    coords = np.stack(grid, axis=-1).astype(float)
    n = len(grid[0][slices].ravel())
    centre_xyz = np.stack([c[slices].ravel() for c in grid], axis=1).astype(float)
    centre_lab, centre_g = np.zeros((n, lab.shape[-1])), np.zeros((n, g.shape[-1]))
    spacing = np.asarray(spacing, dtype=float)
    labels = np.zeros((depth, height, width), dtype=np.intp)
    for _ in range(max_num_iter):
        distance = np.full((depth, height, width), np.inf)
        changed = False
        for k in range(n):
            lo = [max(int(centre_xyz[k, a] - 2 * steps[a]), 0) for a in range(3)]
            hi = [min(int(centre_xyz[k, a] + 2 * steps[a] + 1), size) for a, size in enumerate((depth, height, width))]
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            ds = np.sqrt((((coords[window] - centre_xyz[k]) * spacing) ** 2).sum(-1))
            dc = np.sqrt(((lab[window] - centre_lab[k]) ** 2).sum(-1))
            dg = np.sqrt(((g[window] - centre_g[k]) ** 2).sum(-1))
            total = (dc / wc) ** 2 + (ds / ws) ** 2 + (dg / wg) ** 2
            closer = total < distance[window]
            changed |= bool(closer.any())
            distance[window] = np.where(closer, total, distance[window])
            labels[window] = np.where(closer, k, labels[window])
        if not changed:
            break
        for k in range(n):
            members = labels == k
            if members.any():
                centre_xyz[k], centre_lab[k], centre_g[k] = coords[members].mean(0), lab[members].mean(0), g[members].mean(0)
            else:
                centre_xyz[k], centre_lab[k], centre_g[k] = 0, 0, 0
    return labels[0] if is_image else labels


@pytest.fixture(scope="module")
def small_image():
    image = transform.resize(data.coffee(), (24, 32), anti_aliasing=True)
    yy, xx = np.mgrid[:24, :32]
    scores = np.exp(-((yy - 10) ** 2 + (xx - 20) ** 2) / 30.0) + 0.1 * np.sin(xx)
    return image, scores


# The last weights give features spanning less than 1, the last iteration count stops early.
@pytest.mark.parametrize("variant,wc,wg,iterations",
                         [("i", 10.0, 10.0, 10), ("g", 10.0, 6.0, 10), ("i_g", 8.0, 12.0, 10), ("i_g", 500.0, 400.0, 10),
                          ("i_g", 8.0, 12.0, 2)])
def test_skimage_slic_reproduces_the_thesis_distance_on_an_image(small_image, variant, wc, wg, iterations):
    image, scores = small_image
    ours = gradient_slic(image, scores, variant=variant, n_segments=12, wc=wc, wg=wg, enforce_connectivity=False,
                         max_num_iter=iterations)
    reference = reference_slic(image, scores, n_segments=12, wc=wc, wg=wg, variant=variant, max_num_iter=iterations)
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)


def test_constant_scores_give_the_spatial_grid(small_image):
    image, scores = small_image
    constant = np.full_like(scores, 0.3)
    ours = gradient_slic(None, constant, variant="g", n_segments=12, enforce_connectivity=False)
    np.testing.assert_array_equal(ours, reference_slic(None, constant, n_segments=12, wc=10.0, wg=10.0, variant="g"))
    assert ours.max() + 1 == 12


def test_segments_are_connected_by_default(small_image):
    image, scores = small_image
    segments = gradient_slic(image, scores, variant="i_g", n_segments=30, wc=2.0, wg=2.0)
    for label in np.unique(segments):
        assert measure.label(segments == label, connectivity=1).max() == 1, label


def test_the_reference_is_sensitive_to_the_weights(small_image):
    image, scores = small_image
    ours = gradient_slic(image, scores, variant="i_g", n_segments=12, wc=8.0, wg=12.0, enforce_connectivity=False)
    other = reference_slic(image, scores, n_segments=12, wc=40.0, wg=2.0, variant="i_g")
    assert (ours != other).mean() > 0.05


def test_skimage_slic_reproduces_the_thesis_distance_on_a_clip():
    frames = transform.resize(data.astronaut(), (48, 48), anti_aliasing=True)
    clip = np.stack([np.roll(frames[8:40, 8:40], shift=2 * t, axis=1) for t in range(6)])
    tt, yy, xx = np.mgrid[:6, :32, :32]
    scores = np.exp(-((yy - 16) ** 2 + (xx - 8 - 2 * tt) ** 2) / 40.0)
    for spacing in (1.0, 0.5):
        ours = gradient_slic(clip, scores, variant="i_g", n_segments=16, wc=20.0, wg=9.0, temporal_spacing=spacing,
                             enforce_connectivity=False)
        reference = reference_slic(clip, scores, n_segments=16, wc=20.0, wg=9.0, variant="i_g", spacing=(spacing, 1, 1))
        np.testing.assert_array_equal(ours, reference)


def test_scores_are_rescaled_to_the_lab_range():
    rescaled = rescale_scores(np.array([[2.0, 4.0], [6.0, 10.0]]))
    np.testing.assert_allclose(rescaled, [[0, 25], [50, 100]])
    constant = rescale_scores(np.full((2, 2), 3.0))
    assert constant.shape == (2, 2) and not constant.any()


def test_every_swag_segment_score_is_the_mean_of_m_over_its_segment(small_image):
    image, scores = small_image
    result = swag(image, scores, variant="i_g", n_segments=20, wc=10.0, wg=10.0)
    assert result.heatmap.dtype == np.float32 and result.heatmap.shape == scores.shape
    assert result.segment_scores.shape == (result.segments.max() + 1,)
    for label in np.unique(result.segments):
        members = result.segments == label
        assert result.segment_scores[label] == pytest.approx(scores[members].mean(), rel=1e-6)
        assert np.all(result.heatmap[members] == result.segment_scores[label])
    np.testing.assert_allclose(segment_means(np.arange(4.0), np.array([0, 0, 1, 1])), [0.5, 2.5])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_segments": 0}, r"n_segments: expected an int in \[1, 10000\]"),
        ({"n_segments": 10**6}, "n_segments"),
        ({"n_segments": True}, "n_segments"),
        ({"wc": -1.0}, r"wc: expected a weight in \(0, 1000\]"),
        ({"wc": 0.0}, "wc: "),
        ({"wg": 1000.5}, "wg: "),
        ({"wg": float("nan")}, "wg: "),
        ({"variant": "x"}, "variant"),
    ],
)
def test_bad_parameters_raise(small_image, kwargs, message):
    image, scores = small_image
    with pytest.raises(ValueError, match=message):
        gradient_slic(image, scores, **kwargs)


def purity(segments, classes):
    """Share of pixels whose segment's majority class is their own (1 = segments never cross an edge)."""
    agreeing = 0
    for label in np.unique(segments):
        agreeing += np.bincount(classes[segments == label]).max()
    return agreeing / classes.size


def test_raising_wc_follows_colour_and_raising_wg_follows_the_scores():
    # A red/blue edge along one diagonal and a score step along the other: no compact segment
    # can follow both, so the weights decide which edge the segments keep to.
    yy, xx = np.mgrid[:48, :48]
    colour_class = (yy > xx).astype(int)
    score_class = (yy + xx > 47).astype(int)
    image = np.where(colour_class[..., None] == 1, [0.9, 0.1, 0.1], [0.1, 0.1, 0.9])
    scores = score_class.astype(float)
    purities = {}
    for name, wc, wg in (("colour", 1.0, 1000.0), ("scores", 1000.0, 1.0)):
        segments = gradient_slic(image, scores, variant="i_g", n_segments=9, wc=wc, wg=wg)
        purities[name] = (purity(segments, colour_class), purity(segments, score_class))
    # A large wc lowers the colour term's influence (thesis, after eq. 3.4); a large wg the score term's.
    colour_led, score_led = purities["colour"], purities["scores"]
    assert colour_led[0] > 0.98 and colour_led[0] > colour_led[1] + 0.05, purities
    assert score_led[1] > 0.98 and score_led[1] > score_led[0] + 0.05, purities


def test_the_ends_of_the_accepted_ranges_are_accepted():
    assert check_superpixel_parameters(np.int64(MAX_SEGMENTS), 1000.0, 0.5, "i_g") is None
    assert check_superpixel_parameters(1, 0.01, 1000.0, "g") is None


def test_the_defaults_are_the_slic_weights_and_a_frame_per_pixel_step(small_image):
    # wc = 10 is SLIC's own default (thesis §3.4), used for wg too; a frame step weighs a pixel step.
    image, scores = small_image
    np.testing.assert_array_equal(gradient_slic(image, scores, n_segments=20),
                                  gradient_slic(image, scores, n_segments=20, wc=10.0, wg=10.0))
    clip = np.stack([np.roll(image, 3 * t, axis=1) for t in range(8)])
    clip_scores = np.stack([np.roll(scores, 3 * t, axis=1) for t in range(8)])
    np.testing.assert_array_equal(gradient_slic(clip, clip_scores, n_segments=40),
                                  gradient_slic(clip, clip_scores, n_segments=40, temporal_spacing=1.0))


def _degenerate_inputs():
    rng = np.random.default_rng(0)
    frame, frame_scores = rng.random((1, 32, 32, 3)), rng.random((1, 32, 32))
    return {
        "noise image": (rng.random((48, 48, 3)), rng.random((48, 48)), {"n_segments": 300, "wc": 12.0, "wg": 16.0}),
        "flat image": (np.full((48, 48, 3), 0.4), np.zeros((48, 48)), {"n_segments": 300, "wc": 12.0, "wg": 16.0}),
        "noise clip": (rng.random((8, 32, 32, 3)), rng.random((8, 32, 32)), {"n_segments": 120, "wc": 20.0, "wg": 9.0}),
        "flat clip": (np.full((8, 32, 32, 3), 0.7), np.zeros((8, 32, 32)), {"n_segments": 120, "wc": 20.0, "wg": 9.0}),
        "identical frames": (np.repeat(frame, 8, 0), np.repeat(frame_scores, 8, 0),
                             {"n_segments": 120, "wc": 20.0, "wg": 9.0}),
    }


@pytest.mark.parametrize("case", _degenerate_inputs())
@pytest.mark.parametrize("variant", ["i", "g", "i_g"])
def test_noise_flat_colour_and_identical_frames_never_give_one_segment(case, variant):
    # Before the retry, noise clips and identical noisy frames collapsed to one supervoxel
    # (and a noise image to 2 superpixels of 300): the SWAG map was then constant.
    image, scores, options = _degenerate_inputs()[case]
    result = swag(image, scores, variant=variant, **options)
    found = len(np.unique(result.segments))
    assert found >= options["n_segments"] / 8, found
    assert result.heatmap.std() > 0 or case.startswith("flat")
    single = gradient_slic(image, scores, variant=variant, **{**options, "n_segments": 1})
    assert len(np.unique(single)) == 1


def test_a_segmentation_is_collapsed_below_an_eighth_of_the_request_and_never_when_one_is_asked():
    from explainserve.superpixels import _collapsed

    def found(count):  # a segmentation with labels 0 .. count - 1
        return np.arange(count, dtype=np.int32).reshape(1, count)

    assert not _collapsed(found(1), 1)
    # More than one asked: at least 2, and at least an eighth of the request, rounded up (24 -> 3).
    assert _collapsed(found(1), 2) and not _collapsed(found(2), 2)
    assert _collapsed(found(2), 24) and not _collapsed(found(3), 24)
