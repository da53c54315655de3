"""Out-of-distribution detection on FashionScenes: the Grad-AMap anomaly verdict against logit
baselines (MSP, MaxLogit, Energy) and feature baselines (KNN, ViM, Mahalanobis, ReAct + Energy,
ASH-S from pytorch-ood; CARef and CADRef; bench/ood_baselines.py). A section of bench/REPORT.md.

Every input goes through the network once, as the server sees it (``Explainer.prepare``,
normalisation, one probe pass with logit gradients at the target layer) and is scored against
its *predicted* class with the committed demo store (explainserve/models/stores/image). The
feature baselines are fitted on the first ``--ood-fit-n`` training images (pooled features and
feature maps of the same pass). The detectors are compared at a calibrated point: the verdict
flags p < the store's target rate (1 %); every other detector gets the threshold that flags at
most that rate of the validation split the store was calibrated on. The realised FPR is then
measured on test images, which neither the store nor any threshold has seen. The verdict is
also calibrated in-process at 0.1 % and 5 % on the same validation alpha (the command's
calibration, on a copy of the store) to report its realised rate there. AUROCs carry 95 %
percentile-bootstrap intervals (200 resamples, the same for every detector).

Out-of-distribution sets: the held-out classes (Shirt, Bag), the held-out background photos,
and three shifts of the first ``--shift-n`` test images, fixed before any result was seen:
Gaussian noise (σ = 0.1 of the range), colour inversion (255 − x), Gaussian blur (σ = 1.5 px).

Run alone (``python bench/eval_ood.py``) it rewrites only its section of bench/REPORT.md;
``bench/evaluate.py`` runs it as the last section of the full report.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explainserve.anomaly import Scorer, StoreError, calibrate, load_store, save_calibration  # noqa: E402
from explainserve.explainer import FilterScores  # noqa: E402
from explainserve.evaluation.ood import (BASELINES, auroc, auroc_bootstrap_interval,  # noqa: E402
                                         exact_mcnemar_p, threshold_at_fpr)
from explainserve.probe import probe  # noqa: E402

from bench.ood_extended import NAME as EXTENDED  # noqa: E402
from bench.ood_extended import ExtendedVerdict, FisherVerdict, extended_tests, own_classes  # noqa: E402
from bench.ood_alpha_mahalanobis import ALONE as ALPHA_ALONE  # noqa: E402
from bench.ood_alpha_mahalanobis import NAME as ALPHA_EXTENDED  # noqa: E402
from bench.ood_alpha_mahalanobis import AlphaMahalanobis  # noqa: E402
from bench.ood_caref_verdict import NAME as CAREF  # noqa: E402
from bench.ood_caref_verdict import caref_tests  # noqa: E402
from explainserve.anomaly.calibration import split_parts  # noqa: E402

HEADING = "## Table 7: out-of-distribution detection (FashionScenes; Grad-AMap verdict vs logit and feature baselines)"
REPORT = Path(__file__).resolve().parent / "REPORT.md"
NOTES = Path(__file__).resolve().parent / "ood_notes.md"
VERDICT = "verdict"
ALPHA_ONLY = "verdict, alpha only"
# The served tests combined by their summed tail evidence (bench/ood_extended.py FisherVerdict).
# Keep rule, fixed before its first run (at --ood-test-n 4000 --ood-n 2000 --ood-shift-n 2000
# --ood-fit-n 2000): the five-test Fisher verdict replaces the min-p combination in the server
# if its AUROC is >= the served verdict's on at least 4 of the 5 image sets, above the upper end
# of the served verdict's interval on at least 2, and its realised test FPR at 1 % is no
# further from 1 % than the served verdict's.
FISHER = "verdict, Fisher"
ALPHA_FISHER = "verdict, alpha only, Fisher"
#: Rows of the served verdict's five tests alone, in its statistics' column order.
TESTS = ("surprise", "missing", "−β_z", "feature-Mahalanobis", "feature residual")
LOGIT_BASELINES = tuple(BASELINES)
#: The counts :func:`compare` returns beside its table, carried into a section's results.
COUNTS = ("best_of", "tpr_vs_energy", "fisher_best_of", "fisher_tpr_vs_energy", "fisher_ge_verdict",
          "fisher_above_verdict_interval", "fisher_kept", "extended_best_of", "extended_above_verdict", "alpha_best_of", "alpha_beyond_interval",
          "alpha_only_best_of", "beyond_alpha_only_interval", "fisher_only_test", "verdict_only_test",
          "fisher_rate_mcnemar_p", "caref_ge_verdict", "caref_above_verdict_interval", "caref_best_of",
          "caref_tpr_vs_energy", "caref_kept")
OTHER_TARGETS = (0.001, 0.05)
NOISE_SIGMA, BLUR_SIGMA = 0.1, 1.5


def gaussian_noise(samples: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    noisy = samples.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA * 255, samples.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def inversion(samples: np.ndarray) -> np.ndarray:
    return 255 - samples


def blur(samples: np.ndarray) -> np.ndarray:
    """Each (H, W, 3) picture of ``samples`` (..., H, W, 3) blurred: images one by one, clips frame by frame."""
    pictures = samples.reshape(-1, *samples.shape[-3:])
    blurred = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(BLUR_SIGMA))) for p in pictures]
    return np.stack(blurred).reshape(samples.shape)


SHIFTS = {f"noise σ={NOISE_SIGMA:g}": gaussian_noise, "inversion": inversion, f"blur σ={BLUR_SIGMA:g} px": blur}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("image", "image_large"), default="image",
                        help="demo image model evaluated (image: 64 px, 128 filters; image_large: 112 px, 512 filters)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ood-test-n", type=int, default=8000, help="in-distribution test images (realised FPR, AUROC negatives)")
    parser.add_argument("--ood-n", type=int, default=8000, help="images of each OOD split (held-out classes: at most 2000)")
    parser.add_argument("--ood-shift-n", type=int, default=4000, help="test images shifted by each of noise, inversion, blur")
    parser.add_argument("--ood-batch-size", type=int, default=64, help="images per network pass")
    parser.add_argument("--ood-fit-n", type=int, default=4000, help="training images the feature baselines are fitted on")
    parser.add_argument("--ood-resamples", type=int, default=200, help="bootstrap resamples of each AUROC")


def open_model(demo: str = "image"):
    """The Explainer of demo model ``demo`` ("image", "image_large" or "video") named as
    `archive --demo` serves it, and its committed store."""
    from explainserve.commands.archive import demo_store
    from explainserve.commands.distributions import load_model
    from explainserve.explainer import Explainer

    model, metadata = load_model(demo)
    explainer = Explainer(model, kind=metadata["kind"], input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"])
    folder, record, weights = demo_store(demo)
    if record is None or record["weights_sha256"] != weights:
        raise StoreError(f"{folder} was not built from the package's {demo} weights {weights[:12]}: "
                         "rebuild it with explainserve build-distributions (see README)")
    store = load_store(folder, model_name=metadata["name"], model_version=metadata["version"])
    return explainer, store


def network_pass(explainer, samples: np.ndarray, batch_size: int, desc: str, baselines=None,
                 keep_maps: int = 0) -> dict:
    """Logits (n, N), predicted class (n,), Grad-AMap alpha (n, K) for the predicted class and
    pooled features (n, K), computed as the server computes them (Explainer.prepare, FilterScores.of); with ``baselines``, their
    scores; with ``keep_maps``, the first ``keep_maps`` feature maps."""
    logits, predicted, alpha, features, maps, scores = [], [], [], [], [], {}
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
        prepared = explainer.prepare(list(samples[start:start + batch_size]))
        result = probe(explainer.model, prepared.inputs, layer=explainer.layer, input_gradient=False)
        served = FilterScores.of(result)
        activations = result.activations.detach()
        logits.append(served.logits.astype(np.float64))
        predicted.append(served.predicted)
        alpha.append(served.alpha)
        features.append(activations.flatten(2).mean(dim=2).numpy())
        if start < keep_maps:
            maps.append(activations[:keep_maps - start].clone())
        if baselines is not None:
            for name, value in baselines.scores(activations).items():
                scores.setdefault(name, []).append(value)
    passed = {"logits": np.concatenate(logits), "predicted": np.concatenate(predicted), "alpha": np.concatenate(alpha),
              "features": np.concatenate(features), "scores": {k: np.concatenate(v) for k, v in scores.items()}}
    if keep_maps:
        passed["maps"] = torch.cat(maps)
    return passed


def detector_scores(scorer: Scorer, passed: dict) -> tuple[dict, object, object]:
    """Anomaly scores (higher = more anomalous) of every detector, the served verdict's
    BatchScores (alpha and pooled features) and the alpha-only verdict's (what a client that
    sends alpha alone gets)."""
    batch = scorer.score(passed["alpha"], passed["predicted"], features=passed["features"])
    alpha_only = scorer.score(passed["alpha"], passed["predicted"])
    scores = {VERDICT: batch.score, ALPHA_ONLY: alpha_only.score}
    scores.update({name: batch.statistics[:, column].astype(np.float64) for column, name in enumerate(TESTS)})
    scores.update({name: function(passed["logits"]) for name, function in BASELINES.items()})
    scores.update(passed["scores"])
    return scores, batch, alpha_only


def beta_logit_fit(passed: dict, beta: np.ndarray) -> float:
    """Smallest per-class Pearson correlation between β and the predicted class's logit (test set)."""
    top = passed["logits"].max(axis=1)
    correlations = [np.corrcoef(beta[passed["predicted"] == c], top[passed["predicted"] == c])[0, 1]
                    for c in np.unique(passed["predicted"]) if (passed["predicted"] == c).sum() > 2]
    return float(min(correlations))


def recalibrated_rates(store, passes: dict, target: float, sets: list) -> dict:
    """The verdict calibrated at ``target`` on the val alpha (a copy of the store): realised
    FPR on test and TPR on every OOD set."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eval-ood-") as scratch:
        copy = Path(shutil.copytree(store.path, Path(scratch) / "store"))
        copied = load_store(copy)
        save_calibration(copied, calibrate(copied, passes["val"]["alpha"], passes["val"]["predicted"],
                                           features=passes["val"]["features"], target_fpr=target))
        scorer = Scorer(load_store(copy))
        rates = {name: float(scorer.score(passes[name]["alpha"], passes[name]["predicted"],
                                          features=passes[name]["features"]).anomalous.mean())
                 for name in ("test", *sets)}
        rates["own_classes"] = scorer.store.calibration["classes"]["source"].count("class")
    return rates


def alpha_mahalanobis_rows(store, passes: dict, scored: dict, target: float) -> dict:
    """Add the alpha-Mahalanobis test alone and the alpha-only verdict with it as a fourth test to ``scored``
    (bench/ood_alpha_mahalanobis.py: fitted on val's part A); returns the verdict's flags per split."""
    val = passes["val"]
    part_a = ~split_parts(val["predicted"])
    test = AlphaMahalanobis(store.arrays["mean"], store.arrays["scale"], val["alpha"][part_a], val["predicted"][part_a])

    def tests(split: str) -> np.ndarray:
        distance = test.distance(passes[split]["alpha"], passes[split]["predicted"])
        scored[split][0][ALPHA_ALONE] = distance
        return np.column_stack([scored[split][1].statistics[:, :3], distance]).astype(np.float32)

    verdict = ExtendedVerdict(tests("val"), val["predicted"], own_classes(store), target)
    flags = {}
    for split, passed in passes.items():
        scored[split][0][ALPHA_EXTENDED], flags[split] = verdict.score(tests(split), passed["predicted"])
    return flags


def compare(store, passes: dict, oods: list, resamples: int) -> dict:
    """Every detector on the network passes ``passes`` (split name -> :func:`network_pass` with
    baselines; "val" sets the thresholds, "test" holds the negatives, ``oods`` name the positive
    sets), scored against ``store``. Returns a dict: "table" (detector -> FPRs and, per OOD set,
    AUROC with its bootstrap interval and TPR), "scored" (split -> (scores, BatchScores)) and the
    counts "best_of", "tpr_vs_energy" (the served verdict), "alpha_only_best_of",
    "beyond_alpha_only_interval" (sets where the served verdict is above the upper end of the
    alpha-only verdict's interval), "extended_best_of", "extended_above_verdict" (the alpha-only
    verdict with the energy test, against the alpha-only verdict), "alpha_best_of",
    "alpha_beyond_interval" (with the alpha-Mahalanobis test, above the alpha-only verdict's interval)."""
    from bench.ood_baselines import FEATURE_DETECTORS

    baseline_names = (*LOGIT_BASELINES, *FEATURE_DETECTORS)
    scorer, target = Scorer(store), store.calibration["target_fpr"]
    scored, alpha_only = {}, {}
    for name, passed in passes.items():
        scores, batch, alpha_only[name] = detector_scores(scorer, passed)
        scored[name] = (scores, batch)
    extended = ExtendedVerdict(extended_tests(alpha_only["val"], passes["val"]["logits"]), passes["val"]["predicted"],
                               own_classes(store), target)
    extended_flags = {}
    for split, passed in passes.items():
        scored[split][0][EXTENDED], extended_flags[split] = extended.score(
            extended_tests(alpha_only[split], passed["logits"]), passed["predicted"])
    alpha_flags = alpha_mahalanobis_rows(store, passes, scored, target)
    fisher_flags = {}
    for name, statistics in ((FISHER, lambda split: scored[split][1].statistics[:, :-1]),
                             (ALPHA_FISHER, lambda split: alpha_only[split].statistics[:, :-1])):
        fisher = FisherVerdict(statistics("val"), passes["val"]["predicted"], own_classes(store), target)
        fisher_flags[name] = {}
        for split, passed in passes.items():
            scored[split][0][name], fisher_flags[name][split] = fisher.score(statistics(split), passed["predicted"])
    # The served five tests and CARef's relative deviation from the store's part-A class means
    # (bench/ood_caref_verdict.py states its keep rule).
    class_means = scorer.feature_tests.class_means
    caref = ExtendedVerdict(caref_tests(scored["val"][1], passes["val"]["features"], class_means),
                            passes["val"]["predicted"], own_classes(store), target)
    caref_flags = {}
    for split, passed in passes.items():
        scored[split][0][CAREF], caref_flags[split] = caref.score(
            caref_tests(scored[split][1], passed["features"], class_means), passed["predicted"])
    detectors = (VERDICT, ALPHA_ONLY, FISHER, ALPHA_FISHER, CAREF, *TESTS, EXTENDED, ALPHA_ALONE, ALPHA_EXTENDED,
                 *baseline_names)

    table = {}
    for name in detectors:
        if name == VERDICT:
            flags = {split: scored[split][1].anomalous for split in scored}
        elif name == ALPHA_ONLY:
            flags = {split: alpha_only[split].anomalous for split in scored}
        elif name == EXTENDED:
            flags = extended_flags
        elif name == ALPHA_EXTENDED:
            flags = alpha_flags
        elif name == CAREF:
            flags = caref_flags
        elif name in fisher_flags:
            flags = fisher_flags[name]
        else:
            threshold = threshold_at_fpr(scored["val"][0][name], target)
            flags = {split: scored[split][0][name] > threshold for split in scored}
        row = {"val_fpr": float(flags["val"].mean()), "test_fpr": float(flags["test"].mean())}
        for ood in oods:
            low, high = auroc_bootstrap_interval(scored["test"][0][name], scored[ood][0][name],
                                                 resamples=resamples, seed=0)
            row[ood] = {"auroc": auroc(scored["test"][0][name], scored[ood][0][name]), "low": low, "high": high,
                        "tpr": float(flags[ood].mean())}
        table[name] = row

    def best_of(name: str) -> int:
        return sum(table[name][ood]["auroc"] >= max(table[b][ood]["auroc"] for b in baseline_names) for ood in oods)

    def beyond_alpha_only(name: str) -> int:
        return sum(table[name][ood]["auroc"] > table[ALPHA_ONLY][ood]["high"] for ood in oods)

    def tpr_vs_energy(name: str) -> int:
        return sum(table[name][ood]["tpr"] >= table["Energy"][ood]["tpr"] for ood in oods)

    def ge_verdict(name: str) -> int:
        return sum(table[name][ood]["auroc"] >= table[VERDICT][ood]["auroc"] for ood in oods)

    def above_verdict_interval(name: str) -> int:
        return sum(table[name][ood]["auroc"] > table[VERDICT][ood]["high"] for ood in oods)

    fisher_ge, fisher_above = ge_verdict(FISHER), above_verdict_interval(FISHER)
    fisher_rate = abs(table[FISHER]["test_fpr"] - target) <= abs(table[VERDICT]["test_fpr"] - target)
    caref_ge, caref_above = ge_verdict(CAREF), above_verdict_interval(CAREF)
    caref_rate = abs(table[CAREF]["test_fpr"] - target) <= 0.25 * target
    # Whether the two realised rates differ beyond chance (a diagnostic, no keep rule): the test
    # images only one of the two verdicts flags.
    verdict_test, fisher_test = scored["test"][1].anomalous, fisher_flags[FISHER]["test"]
    fisher_only, verdict_only = int((fisher_test & ~verdict_test).sum()), int((verdict_test & ~fisher_test).sum())

    return {"table": table, "scored": scored, "baselines": baseline_names, "best_of": best_of(VERDICT),
            "tpr_vs_energy": tpr_vs_energy(VERDICT), "fisher_best_of": best_of(FISHER),
            "fisher_tpr_vs_energy": tpr_vs_energy(FISHER), "fisher_ge_verdict": fisher_ge,
            "fisher_above_verdict_interval": fisher_above,
            "fisher_kept": fisher_ge >= 4 and fisher_above >= 2 and fisher_rate,
            "alpha_only_best_of": best_of(ALPHA_ONLY), "beyond_alpha_only_interval": beyond_alpha_only(VERDICT),
            "extended_best_of": best_of(EXTENDED),
            "extended_above_verdict": sum(table[EXTENDED][ood]["auroc"] > table[ALPHA_ONLY][ood]["auroc"] for ood in oods),
            "alpha_best_of": best_of(ALPHA_EXTENDED), "alpha_beyond_interval": beyond_alpha_only(ALPHA_EXTENDED),
            "fisher_only_test": fisher_only, "verdict_only_test": verdict_only,
            "fisher_rate_mcnemar_p": exact_mcnemar_p(fisher_only, verdict_only),
            "caref_ge_verdict": caref_ge, "caref_above_verdict_interval": caref_above, "caref_best_of": best_of(CAREF),
            "caref_tpr_vs_energy": tpr_vs_energy(CAREF),
            "caref_kept": caref_ge >= 4 and caref_above >= 2 and caref_rate}


def run(args) -> dict:
    """Every number of the section (a plain dict); raises FileNotFoundError/StoreError without a store."""
    from bench.ood_baselines import FeatureBaselines
    from explainserve import data

    torch.set_num_threads(2)
    started = time.perf_counter()
    explainer, store = open_model(args.model)
    model = explainer.model
    scenes = functools.partial(data.FashionScenes, seed=0, image_size=explainer.input_size[-1])
    target = store.calibration["target_fpr"]
    val = scenes("val", size=store.calibration["held_out_images"])  # the composites the store was calibrated on
    test = scenes("test", size=args.ood_test_n)
    fit = scenes("train", size=args.ood_fit_n)
    test_images, test_labels, _, _ = test.batch()
    sets = {"held-out classes": scenes("ood_classes", size=min(args.ood_n, 2000)),
            "held-out backgrounds": scenes("ood_backgrounds", size=args.ood_n)}
    batches = {name: dataset.batch() for name, dataset in sets.items()}
    samples = {name: batch.images for name, batch in batches.items()}
    labels = {"held-out backgrounds": batches["held-out backgrounds"].labels}
    for name, shift in SHIFTS.items():
        samples[name] = shift(test_images[: args.ood_shift_n])
        labels[name] = test_labels[: args.ood_shift_n]

    fit_images, fit_labels, _, _ = fit.batch()
    fitted = network_pass(explainer, fit_images, args.ood_batch_size, "fit", keep_maps=1000)
    baselines = FeatureBaselines(model.classifier, fitted["features"], fit_labels, fitted["maps"])
    del fitted
    val_images, val_labels, _, _ = val.batch()
    if len(val_images) != store.calibration["held_out_images"]:
        raise StoreError(f"the store was calibrated on {store.calibration['held_out_images']} images, "
                         f"the val split holds {len(val_images)}: rebuild it on the whole val split")
    passes = {"val": network_pass(explainer, val_images, args.ood_batch_size, "val", baselines),
              "test": network_pass(explainer, test_images, args.ood_batch_size, "test", baselines)}
    for name, images in samples.items():
        passes[name] = network_pass(explainer, images, args.ood_batch_size, name, baselines)
    compared = compare(store, passes, list(samples), args.ood_resamples)
    table, scored = compared["table"], compared["scored"]
    accuracy = {"val": float((passes["val"]["predicted"] == val_labels).mean()),
                "test": float((passes["test"]["predicted"] == test_labels).mean())}
    accuracy.update({name: float((passes[name]["predicted"] == y).mean()) for name, y in labels.items()})
    tests = {name: scored[name][1].tests.mean(axis=0).tolist() for name in ("test", *samples)}
    test_names = list(scored["test"][1].test_names)
    other_targets = {t: recalibrated_rates(store, passes, t, list(samples)) for t in OTHER_TARGETS}
    return {
        "model": args.model, "table": table, "sets": list(samples), "accuracy": accuracy, "tests": tests,
        "test_names": test_names,
        **{key: compared[key] for key in COUNTS},
        "other_targets": other_targets, "baselines": list(compared["baselines"]),
        "sizes": {"fit": len(fit_images), "val": len(val_images), "test": len(test_images),
                  **{k: len(v) for k, v in samples.items()}},
        "target_fpr": target, "store_sha256": store.sha256,
        "own_classes": store.calibration["classes"]["source"].count("class"), "num_classes": store.num_classes,
        "num_filters": store.meta.num_filters, "resamples": args.ood_resamples,
        "beta_logit_min_r": beta_logit_fit(passes["test"], scored["test"][1].beta),
        "seconds": time.perf_counter() - started,
    }


def _cell(row: dict, ood: str) -> str:
    cell = row[ood]
    return f"{cell['auroc']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}] / {100 * cell['tpr']:.1f}"


def comparison_rows(r: dict) -> list[str]:
    """The detector table of a section and the sentences comparing the verdict with the
    baselines (``r`` as :func:`run` returns it), as Markdown lines."""
    sets, table, percent = r["sets"], r["table"], 100 * r["target_fpr"]
    rows = ["| detector | FPR val % | FPR test % | " + " | ".join(sets) + " |",
            "|---|---|---|" + "---|" * len(sets)]
    for name, row in table.items():
        rows.append(f"| {name} | {100 * row['val_fpr']:.2f} | {100 * row['test_fpr']:.2f} | "
                    + " | ".join(_cell(row, ood) for ood in sets) + " |")
    best = {ood: max(r["baselines"], key=lambda name: table[name][ood]["auroc"]) for ood in sets}
    return rows + ["", "Best baseline AUROC per set: " + "; ".join(
        f"{ood}: {name} {table[name][ood]['auroc']:.3f} (verdict {table[VERDICT][ood]['auroc']:.3f})"
        for ood, name in best.items()) + ".", "",
        f"The verdict's AUROC is at least every baseline's on {r['best_of']} of {len(sets)} sets (alpha only: "
        f"{r['alpha_only_best_of']}) and above the upper end of the alpha-only verdict's interval on "
        f"{r['beyond_alpha_only_interval']}; its TPR at {percent:g} % is at least Energy's on {r['tpr_vs_energy']} of "
        f"{len(sets)}. With the energy test ({EXTENDED}) the AUROC is above the alpha-only verdict's on "
        f"{r['extended_above_verdict']} of {len(sets)} sets and at least every baseline's on {r['extended_best_of']}. "
        f"With the alpha-Mahalanobis test ({ALPHA_EXTENDED}: bench/ood_alpha_mahalanobis.py, fitted on val's part A) "
        f"the AUROC is above the upper end of the alpha-only verdict's interval on {r['alpha_beyond_interval']} of "
        f"{len(sets)} sets and at least every baseline's on {r['alpha_best_of']}. The same tests combined by their "
        f"summed tail evidence ({FISHER}: bench/ood_extended.py, calibrated as the verdict is, on this run's val images) reach at least the verdict's "
        f"AUROC on {r['fisher_ge_verdict']} of {len(sets)} sets, above the upper end of its interval on "
        f"{r['fisher_above_verdict_interval']}, at least every baseline's on {r['fisher_best_of']}; their TPR at "
        f"{percent:g} % is at least Energy's on {r['fisher_tpr_vs_energy']}. Of the test images, {r['fisher_only_test']} "
        f"are flagged by {FISHER} alone and {r['verdict_only_test']} by the served verdict alone (exact McNemar "
        f"p = {r['fisher_rate_mcnemar_p']:.2g} that the two rates are equal). With CARef's relative deviation as a "
        f"sixth test ({CAREF}: bench/ood_caref_verdict.py, calibrated as the verdict is) the AUROC is at least the "
        f"verdict's on {r['caref_ge_verdict']} of {len(sets)} sets, above the upper end of its interval on "
        f"{r['caref_above_verdict_interval']}, at least every baseline's on {r['caref_best_of']}; its TPR at "
        f"{percent:g} % is at least Energy's on {r['caref_tpr_vs_energy']}.", ""]


def section(r: dict) -> list[str]:
    """The report section as Markdown lines."""
    if "missing" in r:
        return [HEADING, "", f"**Not run:** {r['missing']}", ""]
    sets, table, s = r["sets"], r["table"], r["sizes"]
    percent = 100 * r["target_fpr"]
    rows = [HEADING, "",
            f"Demo model {r['model']} scored against its predicted class with the committed store "
            f"(sha256 {r['store_sha256'][:12]}, {r['num_classes']} classes × {r['num_filters']} filters; "
            f"{r['own_classes']} classes ranked on their own calibration images, the rest class-independent). "
            f"The verdict flags p < {percent:g} %; every other row is read at the threshold flagging at most "
            f"{percent:g} % of the {s['val']} val images the store was calibrated on. Feature baselines "
            f"(pytorch-ood 0.4.0, published defaults; CARef and CADRef as their authors' code, bench/ood_baselines.py) "
            f"fitted on {s['fit']} training images. "
            f"Negatives: {s['test']} in-distribution test images. Positives: "
            + ", ".join(f"{name} {s[name]}" for name in sets)
            + f" (the shifts are of the first {s[sets[-1]]} test images). Seed 0; "
            f"`python bench/eval_ood.py` ({r['seconds'] / 60:.1f} min).",
            "",
            f"Cells: AUROC [95 % bootstrap interval, {r['resamples']} resamples] / TPR % at the calibrated "
            "threshold (higher is better). FPR %: flagged in-distribution images, on val (where the thresholds "
            "were set; for the verdict, half of val ranked it) and realised on test. The verdict is the served "
            "one: five tests on the alpha and the pooled features of one pass. Below it: the verdict a client gets "
            f"when it sends alpha alone ({ALPHA_ONLY}: the three alpha tests), the five tests alone (the graded "
            "surprise and missing statistics, −β_z, the pooled features' Mahalanobis distance from the predicted "
            "class and their residual off the principal subspace), then the alpha-only verdict with a fourth test "
            f"from the same pass, the logits' energy ({EXTENDED}: bench/ood_extended.py, the same split, groups and "
            f"min-p combination; not served), the alpha-space Mahalanobis distance alone ({ALPHA_ALONE}) and the "
            f"alpha-only verdict with it as the fourth test ({ALPHA_EXTENDED}; not served). {CAREF}: the served five "
            "tests and CARef's relative deviation from the store's part-A class means, calibrated as the verdict "
            "is (bench/ood_caref_verdict.py; not served).",
            ""] + comparison_rows(r) + [
        "The verdict calibrated at other targets (on the same val alpha), realised FPR on test and TPR %:", "",
        "| target | classes ranked on their own | FPR test % | " + " | ".join(sets) + " |",
        "|---|---|---|" + "---|" * len(sets)]
    for target, rates in sorted({**r["other_targets"], r["target_fpr"]: None}.items()):
        if rates is None:
            row = table[VERDICT]
            rows.append(f"| {100 * target:g} % (store) | {r['own_classes']} | {100 * row['test_fpr']:.2f} | "
                        + " | ".join(f"{100 * row[ood]['tpr']:.1f}" for ood in sets) + " |")
        else:
            rows.append(f"| {100 * target:g} % | {rates['own_classes']} | {100 * rates['test']:.2f} | "
                        + " | ".join(f"{100 * rates[ood]:.1f}" for ood in sets) + " |")
    rows += ["", "Model accuracy: " + ", ".join(f"{name} {100 * value:.1f} %" for name, value in r["accuracy"].items())
             + " (the held-out classes have no label in the model's classes).", "",
             "Which tests the ANOMALOUS verdicts name (% of images; " + " / ".join(r["test_names"]) + "): "
             + "; ".join(f"{name} {' / '.join(f'{100 * v:.1f}' for v in values)}" for name, values in r["tests"].items())
             + ".", "",
             f"β against the predicted class's logit on test, per class: smallest Pearson r = "
             f"{r['beta_logit_min_r']:.6f} (FashionVGG ends in global average pooling and one linear layer, so "
             "β = (y_c − b_c)/(ZK) − mean_n μ_cn exactly; see DESIGN.md §3).", ""]
    if NOTES.exists():
        rows += ["### Reading", "", NOTES.read_text().strip(), ""]
    return rows


def splice(report: str, lines: list[str], heading: str = HEADING) -> str:
    """Replace the section of ``report`` that starts with ``heading`` (up to the next ``## ``
    heading), or append it."""
    text = "\n".join(lines)
    start = report.find(heading)
    if start < 0:
        return report.rstrip("\n") + "\n\n" + text + "\n"
    end = report.find("\n## ", start + len(heading))
    return report[:start] + text + ("\n" + report[end + 1:] if end >= 0 else "\n")


def summary_lines(results: dict, prefix: str = "") -> list[str]:
    """The verdict's ``name=value`` lines of a :func:`compare` result: best-of and TPR-vs-Energy
    counts over the sets, and the realised test FPR in percent; ``prefix`` names the table."""
    sets = len(results["sets"])
    return [f"{prefix}verdict_auroc_best_of={results['best_of']}/{sets}",
            f"{prefix}verdict_tpr_at_target_ge_energy={results['tpr_vs_energy']}/{sets}",
            f"{prefix}realised_fpr_test_percent={100 * results['table'][VERDICT]['test_fpr']:.2f}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=REPORT, help="report whose Table 7 section is rewritten")
    args = parser.parse_args(argv)
    results = run(args)
    lines = section(results)
    print("\n".join(lines))
    args.out.write_text(splice(args.out.read_text() if args.out.exists() else "", lines))
    print(f"wrote the section into {args.out}")
    print(f"verdict_energy_auroc_best_of={results['extended_best_of']}/{len(results['sets'])}")
    print(f"verdict_energy_auroc_above_verdict={results['extended_above_verdict']}/{len(results['sets'])}")
    print(f"verdict_energy_realised_fpr_test_percent={100 * results['table'][EXTENDED]['test_fpr']:.2f}")
    print(f"verdict_alpha_mahalanobis_auroc_beyond_interval={results['alpha_beyond_interval']}/{len(results['sets'])}")
    print(f"verdict_alpha_mahalanobis_auroc_best_of={results['alpha_best_of']}/{len(results['sets'])}")
    print(f"verdict_alpha_mahalanobis_realised_fpr_test_percent={100 * results['table'][ALPHA_EXTENDED]['test_fpr']:.2f}")
    sets = len(results["sets"])
    print(f"verdict_fisher_auroc_ge_verdict={results['fisher_ge_verdict']}/{sets}")
    print(f"verdict_fisher_auroc_above_verdict_interval={results['fisher_above_verdict_interval']}/{sets}")
    print(f"verdict_fisher_auroc_best_of={results['fisher_best_of']}/{sets}")
    print(f"verdict_fisher_tpr_at_target_ge_energy={results['fisher_tpr_vs_energy']}/{sets}")
    print(f"verdict_fisher_realised_fpr_test_percent={100 * results['table'][FISHER]['test_fpr']:.2f}")
    print(f"verdict_fisher_kept={'yes' if results['fisher_kept'] else 'no'}")
    print(f"verdict_fisher_test_only={results['fisher_only_test']}")
    print(f"verdict_test_only_not_fisher={results['verdict_only_test']}")
    print(f"verdict_fisher_rate_mcnemar_p={results['fisher_rate_mcnemar_p']:.3g}")
    print(f"verdict_caref_auroc_ge_verdict={results['caref_ge_verdict']}/{sets}")
    print(f"verdict_caref_auroc_above_verdict_interval={results['caref_above_verdict_interval']}/{sets}")
    print(f"verdict_caref_auroc_best_of={results['caref_best_of']}/{sets}")
    print(f"verdict_caref_tpr_at_target_ge_energy={results['caref_tpr_vs_energy']}/{sets}")
    print(f"verdict_caref_realised_fpr_test_percent={100 * results['table'][CAREF]['test_fpr']:.2f}")
    print(f"verdict_caref_kept={'yes' if results['caref_kept'] else 'no'}")
    print(f"verdict_auroc_beyond_alpha_only_interval={results['beyond_alpha_only_interval']}/{sets}")
    print(f"verdict_alpha_only_auroc_best_of={results['alpha_only_best_of']}/{sets}")
    print(f"verdict_alpha_only_realised_fpr_test_percent={100 * results['table'][ALPHA_ONLY]['test_fpr']:.2f}")
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
