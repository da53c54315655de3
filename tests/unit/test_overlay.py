"""Pictures by their properties: size, the original's pixels, where outlines and heat fall."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from skimage.segmentation import find_boundaries

from explainserve import overlay as ov

H, W = 20, 30
BAR = ov.COLOUR_BAR_WIDTH + 52  # the bar and its labels


def photo(seed: int = 0, shape=(H, W, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 216, shape, dtype=np.uint8)


def quadrants() -> np.ndarray:
    """Four segments: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    segments = np.zeros((H, W), int)
    segments[:, W // 2:] += 1
    segments[H // 2:] += 2
    return segments


def panel(picture: np.ndarray, index: int, top: int = 0, width: int = W, height: int = H) -> np.ndarray:
    """Panel ``index`` of a row of panels ``width`` wide, starting ``top`` pixels down."""
    x = index * (width + ov.GAP)
    return picture[top:top + height, x:x + width]


def colour(value: float) -> np.ndarray:
    return np.asarray(colormaps[ov.COLORMAP](value)[:3]) * 255


def test_explanation_picture_is_the_original_beside_its_heat_over_the_dimmed_original():
    image = photo()
    heatmap = np.zeros((H, W))
    heatmap[:, W // 2:] = 1.0  # hot on the right half only
    picture = ov.explanation_picture(image, heatmap, opacity=1.0, min_side=0)
    assert picture.shape == (H, 2 * W + 2 * ov.GAP + BAR, 3)
    assert np.array_equal(panel(picture, 0), image)  # the original, untouched
    explained = panel(picture, 1).astype(float)
    cold, hot = explained[:, :W // 2 - 1], explained[:, W // 2 + 1:]
    assert np.abs(cold - ov.DIM * image[:, :W // 2 - 1]).max() <= 0.5  # the dimmed original shows through
    assert np.abs(hot - colour(1.0)).max() <= 0.5                      # full heat at opacity 1
    half = ov.explanation_picture(image, heatmap, opacity=0.5, min_side=0)
    expected = 0.5 * ov.DIM * image[:, W // 2 + 1:] + 0.5 * colour(1.0)
    assert np.abs(panel(half, 1)[:, W // 2 + 1:] - expected).max() <= 0.5  # semi-transparent


def test_colour_bar_runs_from_the_highest_colour_at_the_top_to_the_lowest():
    picture = ov.explanation_picture(photo(), np.linspace(0, 1, H * W).reshape(H, W), min_side=0)
    bar = picture[:, 2 * (W + ov.GAP):2 * (W + ov.GAP) + ov.COLOUR_BAR_WIDTH]
    assert np.abs(bar[0].astype(float) - colour(1.0)).max() <= 1
    assert np.abs(bar[-1].astype(float) - colour(0.0)).max() <= 1
    labels = picture[:, 2 * (W + ov.GAP) + ov.COLOUR_BAR_WIDTH:]
    assert (labels < 100).any()  # the range is written beside it


def test_top_segments_get_a_solid_outline_inside_them_and_the_others_a_light_one():
    image = photo(1)
    segments = quadrants()
    scores = np.array([0.1, 0.2, 0.3, 0.9])  # segment 3 is the top one
    picture = ov.explanation_picture(image, np.zeros((H, W)), segments, scores, top=1, min_side=0)
    explained = panel(picture, 1)
    solid = np.all(explained == ov.TOP_OUTLINE, axis=-1)
    assert solid.any() and (segments[solid] == 3).all()  # drawn in the top segment only
    assert np.array_equal(solid, find_boundaries(segments == 3, mode="inner"))  # exactly around it
    light = find_boundaries(segments, mode="inner") & ~solid
    dimmed = ov.DIM * image.astype(float)
    assert (explained[light].astype(float).mean(-1) > dimmed[light].mean(-1) + 20).all()  # lighter than the panel
    assert (explained[light] != np.array(ov.SEGMENT_OUTLINE)).any(axis=-1).all()           # but blended, not painted
    by_heat = np.zeros((H, W))
    by_heat[:H // 2, :W // 2] = 1  # no scores: ranked by mean heat, segment 0 first
    solid = np.all(panel(ov.explanation_picture(image, by_heat, segments, top=1, min_side=0), 1) == ov.TOP_OUTLINE, -1)
    assert solid.any() and (segments[solid] == 0).all()


def test_title_band_and_enlargement_keep_the_original_whole():
    image = photo(2)
    picture = ov.explanation_picture(image, np.ones((4, 4)), title="swag_i_g: coat", min_side=64)
    factor = 4  # the smallest whole factor that makes 20 reach 64
    band = ov.LINE_HEIGHT + 4
    assert picture.shape[0] == band + factor * H
    assert (picture[:band] < 100).any()  # the title is written
    assert np.array_equal(picture[band:band + factor * H, :factor * W], image.repeat(factor, 0).repeat(factor, 1))


def test_region_picture_outlines_the_region_where_the_segment_is_and_keeps_it_bright():
    image = photo(3)
    segments = quadrants()
    caption = ov.region_caption(7, "coat", [11, 42], 0.5, ov.counterfactual_text(2, True, "shirt", "coat", False))
    picture = ov.region_picture(image, segments, 1, caption, min_side=0)
    assert picture.shape == (H + len(caption) * ov.LINE_HEIGHT + 4, 2 * W + ov.GAP, 3)
    assert np.array_equal(panel(picture, 0), image)
    region = panel(picture, 1)
    mask = segments == 1
    outline = np.all(region == ov.REGION_OUTLINE, axis=-1)
    assert (mask[outline]).all()                                         # inside the region only
    assert outline[find_boundaries(mask, mode="inner")].all()            # all around its edge
    assert outline[0, W // 2:].all() and outline[:, -1][:H // 2].all()   # closed along the picture's edge
    inner = mask & ~outline
    assert np.array_equal(region[inner], image[inner])                   # the region stays bright
    assert np.abs(region[~mask] - ov.DIM * image[~mask].astype(float)).max() <= 0.5  # the rest is dimmed
    assert (picture[H:] < 100).any()                                     # the caption is written


def test_captions_name_the_filter_exemplars_and_counterfactual():
    lines = ov.region_caption(7, "coat", [11, 42], 0.5, "deleting ...")
    assert "filter 7" in lines[0] and "coat" in lines[0] and "11, 42" in lines[1] and lines[2] == "deleting ..."
    assert "none stored" in ov.region_caption(7, "coat", [])[1]
    assert "to shirt: not the label coat" in ov.counterfactual_text(2, True, "shirt", "coat", False)
    assert "label is restored" in ov.counterfactual_text(1, True, "coat", "coat", True)
    assert "does not change" in ov.counterfactual_text(10, False, "shirt", "coat", False)


def test_clip_strip_puts_originals_above_explanations_normalised_over_the_clip():
    clip = photo(4, (10, H, W, 3))
    heatmap = np.zeros((10, H, W))
    heatmap[9] = 1.0  # only the last frame is hot
    segments = np.broadcast_to(quadrants(), (10, H, W))
    strip = ov.explanation_strip(clip, heatmap, segments, np.array([0, 0, 0, 1.0]), max_frames=4, top=1,
                                 opacity=1.0, min_side=0)
    frames = [0, 3, 6, 9]
    assert strip.shape == (2 * H + ov.GAP, 4 * W + 4 * ov.GAP + BAR, 3)
    for n, t in enumerate(frames):
        assert np.array_equal(panel(strip, n), clip[t])
    first, last = panel(strip, 0, top=H + ov.GAP).astype(float), panel(strip, 3, top=H + ov.GAP).astype(float)
    inside = ~find_boundaries(quadrants(), mode="inner")
    assert np.abs(first[inside] - ov.DIM * clip[0][inside]).max() <= 0.5  # a cold frame stays the dimmed original
    assert np.abs(last[inside] - colour(1.0)).max() <= 0.5                # the hot one is hot
    solid = np.all(panel(strip, 0, top=H + ov.GAP) == ov.TOP_OUTLINE, axis=-1)
    assert solid.any() and (quadrants()[solid] == 3).all()                # the top supervoxel in every frame


def test_region_strip_outlines_the_supervoxel_in_each_frame():
    clip = photo(5, (6, H, W, 3))
    segments = np.broadcast_to(quadrants(), (6, H, W)).copy()
    segments[3:] = 0  # the region leaves the clip after frame 2
    strip = ov.region_strip(clip, segments, 2, ["caption"], max_frames=6, min_side=0)
    for t in range(6):
        outline = np.all(panel(strip, t, top=H + ov.GAP) == ov.REGION_OUTLINE, axis=-1)
        if t < 3:
            assert outline.any() and (segments[t][outline] == 2).all()
        else:
            assert not outline.any()


def test_bad_pictures_are_refused_by_name():
    with pytest.raises(ValueError, match="opacity"):
        ov.explanation_picture(photo(), np.zeros((H, W)), opacity=2)
    with pytest.raises(ValueError, match=r"image: expected uint8 \(H, W, 3\)"):
        ov.explanation_picture(np.zeros((H, W)), np.zeros((H, W)))
    with pytest.raises(ValueError, match=r"clip: expected uint8 \(T, H, W, 3\)"):
        ov.explanation_strip(photo(), np.zeros((1, H, W)))


def test_an_explain_answer_draws_its_map_and_its_captioned_surprise_region():
    from explainserve import wire
    from explainserve._generated import explain_pb2
    from explainserve.client import ExplainResult
    from explainserve.result_pictures import counterfactual, map_picture, region_picture

    image, segments = photo(6), quadrants()
    response = explain_pb2.ExplainResponse(predicted_class=1, target_class=1,
                                           classes=[explain_pb2.ClassScore(index=1, name="coat", score=0.9)])
    response.explanations.add(method="swag_i_g", heatmap=wire.quantized_tensor(np.ones((H, W), np.float32)),
                              segments=wire.exact_tensor(segments.astype(np.int32)),
                              segment_scores=wire.exact_tensor(np.arange(4, dtype=np.float32)))
    response.anomaly.predicted.class_index, response.anomaly.predicted.class_name = 1, "coat"
    response.anomaly.label.class_index, response.anomaly.label.class_name = 2, "shirt"
    region = response.anomaly.predicted.surprise_region
    region.filter, region.class_index, region.top_segment, region.alpha = 17, 1, 2, 0.25
    region.segments.CopyFrom(wire.exact_tensor(segments.astype(np.int32)))
    region.exemplars.extend([101, 202])
    region.suppression.deleted_segments.extend([2])
    region.suppression.prediction_changed, region.suppression.predicted_after = True, 2
    region.suppression.label_restored = True
    result = ExplainResult.from_response(response)

    picture = map_picture(image, result)
    band = ov.LINE_HEIGHT + 4
    factor = -(-256 // H)  # enlarged to at least 256 pixels a side
    assert picture.shape[0] == band + factor * H  # under the title "swag_i_g: class coat"
    assert np.array_equal(picture[band:, :factor * W], image.repeat(factor, 0).repeat(factor, 1))
    assert counterfactual(result) == "deleting its top 1 superpixels changes the prediction to shirt: the label is restored"
    drawn = region_picture(image, result, class_names=["a", "coat", "shirt"])
    assert drawn.shape[0] == factor * H + 3 * ov.LINE_HEIGHT + 4  # filter, exemplars, counterfactual
    outline = np.all(drawn[:factor * H, factor * W + ov.GAP:] == ov.REGION_OUTLINE, axis=-1)
    assert outline.any() and (segments.repeat(factor, 0).repeat(factor, 1)[outline] == 2).all()
    response.anomaly.predicted.ClearField("surprise_region")
    assert region_picture(image, ExplainResult.from_response(response)) is None
