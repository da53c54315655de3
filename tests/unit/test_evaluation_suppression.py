"""The surprise-suppression study (thesis 6.4.1): filter choice, the two rankings, "fixed"."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from explainserve.anomaly import FilterFlag, region_flag
from explainserve.evaluation.suppression import study_suppression
from explainserve.explainer import Explainer
from explainserve.probe import probe
from explainserve.swag import segment_means


def test_the_region_filter_is_the_first_live_one_in_served_order():
    # The served order is by robust exceedance, not by alpha minus threshold: filter 3 first.
    flags = [FilterFlag(3, 0.2, 0.1, (), 2.0), FilterFlag(0, 0.0, -1.0, (), 1.5), FilterFlag(1, 0.5, 0.1, (), 0.8)]
    assert region_flag(flags).filter == 3
    assert region_flag(flags[1:]).filter == 1  # filter 0 is silent (alpha exactly 0)
    assert region_flag(flags[1:2]) is None and region_flag([]) is None


def test_the_study_suppresses_the_filter_region_and_the_vanilla_control_on_the_same_superpixels():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    explainer = Explainer(model, kind="image", input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3,
                          class_names=[str(i) for i in range(4)])
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    labels, filters = [1, 2, 3], [5, 100, 300]
    study = study_suppression(explainer, samples, labels, filters, steps=4)
    regions = explainer.filter_regions(samples, filters, targets=labels)
    assert [s.deleted_segments.tolist() for s in study.by_ranking["filtered"]] == \
        [s.deleted_segments.tolist() for s in explainer.suppress_surprise(samples, regions, 4)]
    vanilla = probe(model, explainer.prepare(samples).inputs, target=labels, input_gradient=False,
                    vanilla_gradient=True).vanilla_gradient.abs().amax(dim=1).numpy()
    for control, region, pixel in zip(study.by_ranking["unfiltered"], regions, vanilla):
        assert control.deleted_segments[0] == int(np.argmax(segment_means(pixel, region.segments)))
    fixed = study.fixed("filtered")
    assert fixed.dtype == bool and fixed.tolist() == [s.changed and s.predicted_after == label
                                                      for s, label in zip(study.by_ranking["filtered"], labels)]
