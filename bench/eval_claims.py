"""The thesis's orderings, registered before the run, and their judgement with paired CIs.

:data:`CLAIMS` is fixed in code: the evaluation writes it, with the methods, metrics and sample
sizes, to ``PREREGISTRATION.md`` before it computes anything (:func:`preregistration`), and the
report quotes that file. :func:`judge` then reads each claim off the run's per-sample numbers:
every link "a better than b" gets a paired bootstrap interval (``bench/eval_stats.py``) and a
verdict of holds / does not hold / undecided at this power.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench import eval_stats
from explainserve.evaluation.localisation import CORRECT_IOU

LOCALISATION = ("value", "mean", "energy")
FILTER_RANKINGS = ("random", "grad_cam_pp", "grad_cam", "xgrad_cam", "l1_norm", "taylor", "taylor_class")
SWAG_CHAIN = ("SWAG_G", "SWAG_I+G", "SWAG_I", "Grad-CAM")
SWAG_V_CHAIN = ("SWAG-V_G", "SWAG-V_I+G", "SWAG-V_I", "Grad-CAM")
# The speed half of claim 4 (a median time ratio on a handful of images, without an interval).
SPEED_UP = 50


@dataclass(frozen=True)
class Claim:
    """One ordering of the thesis: in every link (better, worse), ``better`` scores lower.

    Attributes
    ----------
    key : short id in the report.
    text : the ordering as the thesis states it.
    source : where the thesis states it.
    table : the results it is read from: "image" (Tables 1-2), "video" (Table 3), "filters"
        (Table 4) or "suppression" (Table 8).
    metric : "deletion", a localisation family, "auc" or "fixed" (higher is better).
    links : (better, worse) pairs of method / ranking labels; the claim is their conjunction.
    """

    key: str
    text: str
    source: str
    table: str
    metric: str
    links: tuple[tuple[str, str], ...]


def _chain(labels) -> tuple[tuple[str, str], ...]:
    return tuple(zip(labels, labels[1:]))


CLAIMS = (
    Claim("1", "SWAG_G < SWAG_I+G < SWAG_I < Grad-CAM on deletion AUC", "thesis Table 3.7 (VGG16)", "image",
          "deletion", _chain(SWAG_CHAIN)),
    Claim("2a", "Jitter-CAM < Grad-CAM on deletion AUC", "thesis Table 5.2 (ResNet50)", "image", "deletion",
          (("Jitter-CAM", "Grad-CAM"),)),
    *(Claim(f"2{tag}", f"Jitter-CAM localises better than Grad-CAM ({family} threshold)", "thesis Table 5.3",
            "image", family, (("Jitter-CAM", "Grad-CAM"),)) for tag, family in zip("bcd", LOCALISATION)),
    Claim("3", "Grad-AMap has the lowest filter-removal AUC", "thesis Table 6.1 (ResNet18)", "filters", "auc",
          tuple(("grad_amap", other) for other in FILTER_RANKINGS)),
    Claim("4", f"SWAG_G's deletion AUC no worse than LIME-1000's, at ≥ {SPEED_UP}× its speed",
          "thesis Tables 3.7 and 3.11", "image", "deletion", (("SWAG_G", "LIME-1000"),)),
    Claim("5", "SWAG-V_G < SWAG-V_I+G < SWAG-V_I < Grad-CAM on clip deletion AUC", "thesis Table 4.2 (C3D)",
          "video", "deletion", _chain(SWAG_V_CHAIN)),
    Claim("6", "every SWAG-V variant localises clips better than Grad-CAM (value threshold)", "thesis Table 4.3",
          "video", "value", tuple((v, "Grad-CAM") for v in SWAG_V_CHAIN[:3])),
    Claim("7", "deleting the surprising filter's region fixes more misclassified images than the vanilla "
          "gradient's", "thesis 6.4.1, Figure 6.12", "suppression", "fixed", (("filtered", "unfiltered"),)),
)

METRICS = (
    "deletion and insertion AUC (29 steps; deleted pixels set to 0, the dataset mean, inserted into an all-0 input; "
    "softmax of the class predicted on the intact input; per sample)",
    "weak localisation error, value / mean / energy thresholds, each method at its best threshold over the set, "
    "IoU > 0.5 with the box (mean per-frame IoU for clips); per sample: missed or not at that threshold",
    "pointing game (15 px at 224 px, scaled)",
    "filter-removal AUC (16 filters a step, ground-truth class; resampled per image)",
    "surprise suppression: misclassified images whose true class returns (per image)",
)


def preregistration(*, created: str, command: str, models: str, image_methods, video_methods, costly,
                     sizes: dict, segments: dict, mode: str) -> str:
    """The header written before the run: methods, metrics, orderings, sample sizes, decision rule."""
    lines = [
        f"Written {created} UTC, before any result of this run, by `{command}` ({mode} mode).",
        "",
        f"table1_images={sizes['image_n']}",
        f"table3_clips={sizes['video_n']}",
        "",
        f"- Models: {models}.",
        f"- Superpixels: the served default n_segments scaled to the input ({segments}); fixed before this run's "
        "results were seen.",
        f"- Table 1-2 methods: {', '.join(image_methods)}; "
        f"{', '.join(costly)} on the first {sizes['costly_n']} of the {sizes['image_n']} images (1000 forward "
        "passes or more per image).",
        f"- Table 3 methods: {', '.join(video_methods)}.",
        f"- Other sizes: Table 4 {sizes['filter_n']} test images, Table 5 {sizes['timing_n']} timed, "
        f"Table 6 {sizes['ranking_n']}, wc/wg grid {sizes['grid_n']} val images.",
        "- Metrics: " + "; ".join(METRICS) + ".",
        "- Orderings (each link: the first scores lower; for suppression, fixes more):",
        *(f"  {c.key}. {c.text} ({c.source}; Table {_TABLE_NUMBER[c.table]}, {c.metric})" for c in CLAIMS),
        f"- Decision: paired percentile bootstrap over samples, {eval_stats.RESAMPLES} resamples, seed "
        f"{eval_stats.SEED}, {100 * eval_stats.LEVEL:.0f} % interval of the difference (first − second). "
        "A link holds when the interval lies wholly on the claimed side, does not hold when it lies wholly on "
        "the other side, and is undecided otherwise; a claim holds when all its links hold and does not hold "
        "when any does not. A pair is compared on the samples both methods ran on.",
    ]
    return "\n".join(lines) + "\n"


_TABLE_NUMBER = {"image": "1-2", "video": "3", "filters": "4", "suppression": "8"}


def _per_sample(entry: dict, metric: str) -> np.ndarray:
    """Per-sample values of one method, oriented so that lower is better."""
    if metric == "deletion":
        return np.asarray(entry["deletion"], dtype=np.float64)
    found = entry[metric]
    best = int(np.argmin(found.error))
    return (found.iou[:, best] <= CORRECT_IOU).astype(np.float64)


def _auc_difference(a, b, fractions):
    """Filter-removal AUC of ranking a minus b on resamples (R, n) of the images: each image's
    outcomes (B, steps) weighted by how often a resample draws it."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    fractions = np.asarray(fractions, dtype=np.float64)

    def auc(correct: np.ndarray, weights: np.ndarray) -> np.ndarray:
        counts = weights @ correct
        if (counts[:, 0] == 0).any():
            raise ValueError("a resample has no image the model classifies correctly")
        return np.trapezoid(counts / counts[:, :1], fractions, axis=1)

    def statistic(index: np.ndarray) -> np.ndarray:
        weights = np.zeros((len(index), len(a)))
        np.add.at(weights, (np.arange(len(index))[:, None], index), 1.0)
        return auc(a, weights) - auc(b, weights)

    return statistic


def link_difference(results: dict, claim: Claim, better: str, worse: str) -> eval_stats.Difference:
    """The paired bootstrap of one link of ``claim`` on this run's results."""
    if claim.table == "filters":
        filters = results["filters"]
        a, b = filters[better]["correct"], filters[worse]["correct"]
        return eval_stats.bootstrap_difference(_auc_difference(a, b, filters["fractions"]), len(a))
    if claim.table == "suppression":
        fixed = results["suppression"]["per_image"]
        return eval_stats.mean_difference(-fixed[better].astype(np.float64), -fixed[worse].astype(np.float64))
    table = results[claim.table]
    a, b = _per_sample(table[better], claim.metric), _per_sample(table[worse], claim.metric)
    n = min(len(a), len(b))  # a costly method ran on the first samples only
    return eval_stats.mean_difference(a[:n], b[:n])


def judge(results: dict) -> list[dict]:
    """Every claim whose table this run has: its links' differences and its verdict."""
    judged = []
    for claim in CLAIMS:
        table = results.get(claim.table)
        if not isinstance(table, dict) or "missing" in table or (claim.table == "suppression" and
                                                                 table.get("studied", 0) < 2):
            judged.append({"claim": claim, "verdict": None, "links": []})
            continue
        links = [(better, worse, link_difference(results, claim, better, worse)) for better, worse in claim.links]
        verdict = eval_stats.combine([d.verdict() for *_, d in links])
        if claim.key == "4":
            speed = results["cost"]["LIME-1000"] / results["cost"]["SWAG_G"]
            verdict = eval_stats.combine([verdict, eval_stats.HOLDS if speed >= SPEED_UP else eval_stats.FAILS])
            links.append(("speed-up", f"{speed:.0f}×", None))
        judged.append({"claim": claim, "verdict": verdict, "links": links})
    return judged


def render(judged: list[dict]) -> list[str]:
    """The reading section: one line per claim with each link's difference and interval."""
    rows = ["## Reading against the thesis (pre-registered orderings)", "",
            "Each link: first − second, the estimate and its 95 % paired bootstrap interval, on n samples "
            "(lower is better; for localisation the difference of error rates, for suppression of the share "
            "not fixed).", ""]
    for entry in judged:
        claim = entry["claim"]
        if entry["verdict"] is None:
            rows.append(f"{claim.key}. {claim.text}: not run here.")
            continue
        parts = []
        for better, worse, difference in entry["links"]:
            if difference is None:
                parts.append(f"{better} {worse}")
            else:
                parts.append(f"{better} − {worse} = {difference.text()} (n = {difference.n}, "
                             f"{difference.verdict()})")
        rows.append(f"{claim.key}. {claim.text} ({claim.source}): **{entry['verdict']}** — " + "; ".join(parts) + ".")
    return rows + [""]
