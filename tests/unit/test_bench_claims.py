"""The report's paired bootstrap intervals and its holds / does not hold / undecided verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from bench import eval_claims, eval_stats
from explainserve.evaluation.localisation import LocalisationResult


def test_a_constant_difference_has_a_point_interval_and_a_clear_verdict():
    b = np.linspace(0.1, 0.5, 20)
    better = eval_stats.mean_difference(b - 0.05, b)
    assert (better.estimate, better.low, better.high, better.n) == pytest.approx((-0.05, -0.05, -0.05, 20))
    assert better.verdict() == eval_stats.HOLDS
    assert eval_stats.mean_difference(b + 0.05, b).verdict() == eval_stats.FAILS
    assert eval_stats.mean_difference(b, b).verdict() == eval_stats.UNDECIDED


def test_the_interval_matches_scipys_percentile_bootstrap_of_the_paired_mean():
    generator = np.random.default_rng(3)
    a = generator.normal(0.20, 0.05, 200)
    b = a + generator.normal(0.01, 0.03, 200)  # paired: b tracks a
    ours = eval_stats.mean_difference(a, b, resamples=4000)
    theirs = scipy.stats.bootstrap(((a - b),), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                                   random_state=1).confidence_interval
    width = theirs.high - theirs.low
    assert ours.estimate == pytest.approx(np.mean(a - b))
    assert abs(ours.low - theirs.low) < 0.1 * width and abs(ours.high - theirs.high) < 0.1 * width
    # unpaired, the same means would give an interval about 2x wider: the pairing is what gives power
    unpaired = scipy.stats.bootstrap((a, b), lambda x, y: np.mean(x) - np.mean(y), n_resamples=2000,
                                     method="percentile", random_state=1).confidence_interval
    assert unpaired.high - unpaired.low > 1.5 * width


def test_bad_bootstrap_arguments_are_refused():
    with pytest.raises(ValueError, match="n: a bootstrap needs at least 2 samples"):
        eval_stats.mean_difference([0.1], [0.2])
    with pytest.raises(ValueError, match=r"a, b: paired values need one shape"):
        eval_stats.mean_difference([0.1, 0.2], [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"level: must be in \(0, 1\)"):
        eval_stats.mean_difference([0.1, 0.2], [0.2, 0.3], level=1.0)


def test_a_chain_holds_only_when_every_link_holds():
    H, F, U = eval_stats.HOLDS, eval_stats.FAILS, eval_stats.UNDECIDED
    assert eval_stats.combine([H, H, H]) == H
    assert eval_stats.combine([H, U, H]) == U
    assert eval_stats.combine([H, U, F]) == F


def _localisation(missed: np.ndarray) -> LocalisationResult:
    # two thresholds; the first misses everything, the second misses ``missed``: the best is the second
    iou = np.stack([np.zeros(len(missed)), np.where(missed, 0.2, 0.9)], axis=1)
    error = 100.0 * (iou <= 0.5).mean(axis=0)
    return LocalisationResult(np.array([0.1, 0.2]), iou, error, 0.2, float(error[1]))


def _image_table(n: int, deletion: dict, missed: dict) -> dict:
    return {label: {"deletion": values, **{f: _localisation(missed[label]) for f in eval_claims.LOCALISATION}}
            for label, values in deletion.items()}


def test_claims_are_judged_from_per_sample_values():
    n = 60
    generator = np.random.default_rng(0)
    base = generator.uniform(0.1, 0.3, n)
    noise = generator.normal(0, 0.05, n)
    deletion = {"SWAG_G": base, "SWAG_I+G": base + 0.02, "SWAG_I": base + 0.04, "Grad-CAM": base + 0.03,
                "Jitter-CAM": base + 0.03 + noise - noise.mean(), "LIME-1000": base[:20] + 0.01}
    missed = {label: np.zeros(n, bool) for label in deletion}
    missed["Grad-CAM"] = np.arange(n) % 2 == 0  # Grad-CAM misses half the boxes, Jitter-CAM none
    correct = {r: torch.zeros(n, 3, dtype=torch.bool) for r in (*eval_claims.FILTER_RANKINGS, "grad_amap")}
    for ranking in correct:
        correct[ranking][:, 0] = True
        correct[ranking][:, 1] = ranking != "grad_amap"  # grad_amap's removal hurts every sample at once
    results = {
        "image": _image_table(n, deletion, missed),
        "filters": {**{r: {"correct": c} for r, c in correct.items()}, "fractions": torch.tensor([0.0, 0.5, 1.0])},
        "cost": {"SWAG_G": 0.02, "LIME-1000": 2.0},
        "suppression": {"studied": 40, "per_image": {"filtered": np.arange(40) < 10, "unfiltered": np.arange(40) < 12}},
        "video": {"missing": "no clips"},
    }
    judged = {entry["claim"].key: entry for entry in eval_claims.judge(results)}
    # SWAG_I is above Grad-CAM on every image: the chain's last link fails, so the chain fails
    assert [d.verdict() for *_, d in judged["1"]["links"]] == [eval_stats.HOLDS, eval_stats.HOLDS, eval_stats.FAILS]
    assert judged["1"]["verdict"] == eval_stats.FAILS
    assert judged["2a"]["verdict"] == eval_stats.UNDECIDED  # zero-mean noise around Grad-CAM's values
    assert judged["2b"]["verdict"] == eval_stats.HOLDS
    assert judged["2b"]["links"][0][2].estimate == pytest.approx(-0.5)
    assert judged["3"]["verdict"] == eval_stats.HOLDS
    assert judged["3"]["links"][0][2].estimate == pytest.approx(0.25 - 0.75)
    # LIME ran on the first 20 images only: compared there, SWAG_G lower on all of them, 100x faster
    assert judged["4"]["links"][0][2].n == 20 and judged["4"]["verdict"] == eval_stats.HOLDS
    assert judged["5"]["verdict"] is None and judged["6"]["verdict"] is None
    # 10 against 12 fixed, the two extra ones fixed only by the control: not decided on 40 images
    assert judged["7"]["verdict"] == eval_stats.UNDECIDED
    lines = "\n".join(eval_claims.render(list(judged.values())))
    assert "1. SWAG_G < SWAG_I+G < SWAG_I < Grad-CAM on deletion AUC (thesis Table 3.7 (VGG16)): **does not hold**" in lines
    assert "5. SWAG-V_G < SWAG-V_I+G < SWAG-V_I < Grad-CAM on clip deletion AUC: not run here." in lines
    results["cost"]["LIME-1000"] = 0.5  # 25x: the speed half fails
    assert {e["claim"].key: e["verdict"] for e in eval_claims.judge(results)}["4"] == eval_stats.FAILS


def test_the_preregistration_states_the_sizes_and_every_claim():
    sizes = {"image_n": 500, "video_n": 200, "costly_n": 100, "filter_n": 400, "timing_n": 5, "ranking_n": 16,
             "grid_n": 12}
    text = eval_claims.preregistration(created="2026-12-01 12:00", command="python bench/evaluate.py", models="m",
                                       image_methods=["SWAG_G"], video_methods=["SWAG-V_G"], costly=["LIME-1000"],
                                       sizes=sizes, segments="image 24 at 64x64", mode="full")
    assert "\ntable1_images=500\n" in text and "\ntable3_clips=200\n" in text
    assert all(f"  {claim.key}. {claim.text}" in text for claim in eval_claims.CLAIMS)
    assert "2000 resamples" in text
