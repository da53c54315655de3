"""The SLIC call minimises the thesis distance (eq. 3.5): checked against a numpy reference."""

import numpy as np
import pytest
from skimage import data, transform
from skimage.util import regular_grid

from explainserve.superpixels import gradient_slic, rescale_scores, slic_features
from explainserve.swag import segment_means, swag


def reference_slic(image_rgb, scores, *, n_segments, wc, wg, variant, spacing=(1.0, 1.0, 1.0), max_num_iter=10):
    """SLIC k-means written from the thesis: D'^2 = (dc/wc)^2 + (ds/S)^2 + (dg/wg)^2.

    Seeds on skimage's regular grid, search windows of 2S around each centre, centres
    initialised with zero features, as scikit-image does; no connectivity enforcement.
    """
    features = slic_features(image_rgb, scores, variant=variant, wc=wc, wg=wg)
    is_image = features.ndim == 3
    if is_image:
        features = features[None]
    depth, height, width = features.shape[:3]
    slices = regular_grid((depth, height, width), n_segments)
    steps = [int(s.step) if s.step is not None else 1 for s in slices]
    step = float(max(float(s.step) if s.step is not None else 1.0 for s in slices))
    grid = np.mgrid[:depth, :height, :width]
    centres_xyz = np.stack([g[slices].ravel() for g in grid], axis=1).astype(float)
    centres = np.concatenate([centres_xyz, np.zeros((len(centres_xyz), features.shape[-1]))], axis=1)
    coords = np.stack(grid, axis=-1).astype(float)
    spacing = np.asarray(spacing, dtype=float)
    labels = np.zeros((depth, height, width), dtype=np.intp)
    for _ in range(max_num_iter):
        distance = np.full((depth, height, width), np.inf)
        changed = False
        for k, centre in enumerate(centres):
            lo = [max(int(centre[a] - 2 * steps[a]), 0) for a in range(3)]
            hi = [min(int(centre[a] + 2 * steps[a] + 1), n) for a, n in enumerate((depth, height, width))]
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            ds2 = (((coords[window] - centre[:3]) * spacing) ** 2).sum(-1) / step**2
            df2 = ((features[window] - centre[3:]) ** 2).sum(-1)
            total = ds2 + df2
            closer = total < distance[window]
            if closer.any():
                changed = True
            distance[window] = np.where(closer, total, distance[window])
            labels[window] = np.where(closer, k, labels[window])
        if not changed:
            break
        for k in range(len(centres)):
            members = labels == k
            if members.any():
                centres[k, :3] = coords[members].mean(0)
                centres[k, 3:] = features[members].mean(0)
            else:
                centres[k] = 0
    return labels[0] if is_image else labels


@pytest.fixture(scope="module")
def small_image():
    image = transform.resize(data.coffee(), (24, 32), anti_aliasing=True)
    yy, xx = np.mgrid[:24, :32]
    scores = np.exp(-((yy - 10) ** 2 + (xx - 20) ** 2) / 30.0) + 0.1 * np.sin(xx)
    return image, scores


@pytest.mark.parametrize("variant,wc,wg", [("i", 10.0, 10.0), ("g", 10.0, 6.0), ("i_g", 8.0, 12.0)])
def test_skimage_slic_reproduces_the_thesis_distance_on_an_image(small_image, variant, wc, wg):
    image, scores = small_image
    ours = gradient_slic(image, scores, variant=variant, n_segments=12, wc=wc, wg=wg, enforce_connectivity=False)
    reference = reference_slic(image, scores, n_segments=12, wc=wc, wg=wg, variant=variant)
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)


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
    np.testing.assert_array_equal(rescale_scores(np.full((2, 2), 3.0)), np.zeros((2, 2)))


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
        ({"wc": -1.0}, r"wc: expected a weight in \(0, 1000\]"),
        ({"wg": float("nan")}, "wg"),
        ({"variant": "x"}, "variant"),
    ],
)
def test_bad_parameters_raise(small_image, kwargs, message):
    image, scores = small_image
    with pytest.raises(ValueError, match=message):
        gradient_slic(image, scores, **kwargs)
