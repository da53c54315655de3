"""Does deleting what surprised a filter fix a misclassified input? (thesis 6.4.1, Figure 6.12)

For each misclassified input that has a surprising filter *for its true class*, the region of the
most surprising non-silent such filter (the true class's score backpropagated through that filter
alone, pooled into superpixels) is deleted superpixel by superpixel until the prediction changes;
the input is "fixed" when the new prediction is the true class. The thesis's control ranks the
same superpixels by the vanilla gradient of the true class through *every* filter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..explainer import Explainer
from ..methods import SUPPRESSION_STEPS
from ..probe import probe
from ..surprise import FilterRegion, Suppression
from ..swag import segment_means


RANKINGS = ("filtered", "unfiltered")


@dataclass
class SuppressionStudy:
    """Per studied input, the suppression under each ranking of the same superpixels.

    Attributes
    ----------
    by_ranking : dict of str to list of Suppression, each of length n
        "filtered": ranked by the gradient through the surprising filter alone; "unfiltered":
        ranked by the vanilla gradient through every filter.
    labels : ndarray of int, shape (n,)
    """

    by_ranking: dict[str, list[Suppression]]
    labels: np.ndarray

    def fixed(self, ranking: str) -> np.ndarray:
        """Bool (n,): the prediction after deletion is the true label."""
        return np.array([s.changed and s.predicted_after == label
                         for s, label in zip(self.by_ranking[ranking], self.labels)], dtype=bool)


def study_suppression(explainer: Explainer, samples: Sequence[np.ndarray], labels: Sequence[int],
                      filters: Sequence[int], *, steps: int = SUPPRESSION_STEPS) -> SuppressionStudy:
    """Suppress, for each sample, the region of ``filters[i]`` for class ``labels[i]``, and the
    same superpixels ranked by the vanilla gradient of that class through every filter.

    Parameters
    ----------
    explainer : Explainer
    samples : list of uint8 ndarray, each (H, W, 3) or (T, H, W, 3)
    labels, filters : sequences of int, one per sample
    steps : int
        The most superpixels deleted per sample.

    The samples are preprocessed once; both suppressions and the vanilla gradient run on the
    same normalised inputs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    prepared = explainer.prepare(samples)
    regions = explainer.filter_regions(prepared, list(filters), targets=labels.tolist())
    result = probe(explainer.model, prepared.inputs, layer=explainer.layer, target=labels.tolist(), input_gradient=False,
                   vanilla_gradient=True)
    scores = result.vanilla_gradient.abs().amax(dim=1).numpy()
    controls: list[FilterRegion] = []
    for region, pixel in zip(regions, scores):
        means = segment_means(pixel, region.segments)
        controls.append(replace(region, heatmap=means[region.segments], pixel_scores=pixel, segment_scores=means,
                                top_segment=int(np.argmax(means))))
    return SuppressionStudy(
        by_ranking={"filtered": explainer.suppress_surprise(prepared, regions, steps=steps),
                    "unfiltered": explainer.suppress_surprise(prepared, controls, steps=steps)},
        labels=labels,
    )
