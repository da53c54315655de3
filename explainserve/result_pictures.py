"""Pictures of an Explain answer (:class:`explainserve.client.ExplainResult`) on its input.

The CLI, the demo and the bulk report draw with these, so an image and a clip, a map and a
surprise region look the same everywhere (see :mod:`explainserve.overlay`).
"""

from __future__ import annotations

import numpy as np

from explainserve import overlay, wire


def map_picture(data: np.ndarray, result, method: str | None = None, *, with_original: bool = True,
                min_side: int = 256) -> np.ndarray:
    """``method``'s map (default: the first) on ``data``: uint8 (H, W, 3) image or (T, H, W, 3) clip."""
    method = method or next(iter(result.maps))
    explanation = result.maps[method]
    title = f"{method}: class {class_name(result, result.target_class)}"
    draw = overlay.explanation_picture if data.ndim == 3 else overlay.explanation_strip
    return draw(data, explanation.heatmap, explanation.segments, explanation.segment_scores, title=title,
                with_original=with_original, min_side=min_side if data.ndim == 3 else min_side // 2)


def surprise_region(result):
    """The predicted class's :class:`FilterRegion` proto, or None when the answer has none."""
    verdict = result.anomaly.predicted
    return verdict.surprise_region if result.anomaly.HasField("predicted") and verdict.HasField("surprise_region") else None


def region_picture(data: np.ndarray, result, class_names=None, *, with_caption: bool = True,
                   with_original: bool = True, min_side: int = 256) -> np.ndarray | None:
    """The region that triggered the most surprising filter, captioned; None without one.

    class_names : sequence of str, optional; names classes the answer does not name itself.
    """
    region = surprise_region(result)
    if region is None:
        return None
    caption = region_caption(result, class_names) if with_caption else []
    segments = wire.to_numpy(region.segments).astype(np.int64)
    draw = overlay.region_picture if data.ndim == 3 else overlay.region_strip
    return draw(data, segments, region.top_segment, caption, with_original=with_original,
                min_side=min_side if data.ndim == 3 else min_side // 2)


def region_caption(result, class_names=None) -> list[str]:
    """The lines that name the surprise region's filter, exemplars and counterfactual; [] without one."""
    region = surprise_region(result)
    if region is None:
        return []
    return overlay.region_caption(region.filter, class_name(result, region.class_index, class_names),
                                  region.exemplars, region.alpha, counterfactual(result, class_names))


def counterfactual(result, class_names=None) -> str:
    """The suppression sentence when the request carried a label, else ''."""
    region, anomaly = surprise_region(result), result.anomaly
    if region is None or not region.HasField("suppression") or not anomaly.HasField("label"):
        return ""
    suppression = region.suppression
    return overlay.counterfactual_text(len(suppression.deleted_segments), suppression.prediction_changed,
                                       class_name(result, suppression.predicted_after, class_names),
                                       anomaly.label.class_name,
                                       suppression.label_restored)


def class_name(result, index: int, class_names=None) -> str:
    """``index``'s name from ``class_names``, else the answer (top-k, verdicts), else "class <index>"."""
    names = dict(enumerate(class_names or ()))
    names.update((i, name) for i, name, _ in result.classes if i not in names)
    for verdict in (result.anomaly.predicted, result.anomaly.label):
        if verdict.class_name:
            names.setdefault(verdict.class_index, verdict.class_name)
    return names.get(index, f"class {index}")
