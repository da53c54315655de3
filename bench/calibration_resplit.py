"""Is the verdict's realised false-positive rate off target by chance or by construction? Val only.

Splits the validation split itself into a pseudo-calibration half and a pseudo-test half, by
Fashion-MNIST item (every composite of an item on one side, as val and test share no item),
calibrates a copy of the demo store on the first half exactly as ``build-distributions`` does
(:func:`~explainserve.anomaly.calibrate`: its own part A / part B split, the default class
groups) and measures the flagged share of the second half at each target. Repeated over
``--resplits`` seeded item permutations, the mean tells whether the calibration is biased and
the spread how far one calibration scatters. The spread is compared with the binomial
prediction for ranking on n part-B images per group: sqrt(α(1 - α) / n) per group, combined
over the groups by the pseudo-test's shares, plus the pseudo-test draw's own
sqrt(α(1 - α) / m).

Val alpha is computed by build-distributions' own path (``validation_scores``, predicted class; the alpha-only calibration);
``--val-size`` composites are drawn (items cycle with fresh composites past the pool of 4018),
``--cache`` keeps the pass in an ``.npz``. Prints ``name=value`` lines.

With ``--test-size N`` every re-split's calibration also scores the first N images of the test
split (the alpha-only verdict, as the pseudo-test half), which tells a val/test difference from
one calibration's scatter: averaged over the re-splits, the calibration draw's scatter cancels,
so the test's mean realised rate differs from the pseudo-test's mean only by a val/test
difference and the test draw's own sqrt(α(1 - α) / N). The rule, fixed before the first run: at
1 %, a val/test difference is read when the two means differ by more than 2 × the test draw's
standard error (pseudo-test mean's SE added in quadrature); otherwise the test figures are read
as a calibration draw's scatter.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explainserve.anomaly import Scorer, calibrate, load_store, save_calibration  # noqa: E402
from explainserve.anomaly.calibration import default_min_class_count, split_parts  # noqa: E402

TARGETS = (0.001, 0.01, 0.05)


def split_pass(size: int, cache: Path | None, split: str = "val") -> dict:
    """alpha (n, K), predicted (n,) and item (n,) of the first ``size`` composites of ``split``."""
    if cache is not None and cache.is_file():
        loaded = dict(np.load(cache))
        if len(loaded["predicted"]) >= size:
            return {key: value[:size] for key, value in loaded.items() if key in ("alpha", "predicted", "item")}
    from explainserve.commands.distributions import open_split, open_subject, validation_scores

    torch.set_num_threads(2)
    args = argparse.Namespace(model="image", data="fashion-scenes", name=None, version=None, seed=0)
    explainer, _ = open_subject(args)
    dataset, key = open_split(args, split, size, explainer.input_size[-1])
    alpha, predicted, _ = validation_scores(explainer, dataset, key, 32)
    passed = {"alpha": alpha, "predicted": predicted, "item": np.array([dataset.item_index(i) for i in range(size)])}
    if cache is not None:
        np.savez(cache, **passed)
    return passed


def predicted_sd(scorer: Scorer, classes: np.ndarray, target: float) -> float:
    """Binomial standard deviation of the pseudo-test's flagged share, calibration plus test draw."""
    counts = np.where(scorer.from_class, scorer.class_counts, scorer.ranks.counts[-1])
    share = np.bincount(classes, minlength=len(counts)) / len(classes)
    per_group = {}
    for class_id in np.flatnonzero(share):
        group = class_id if scorer.from_class[class_id] else -1
        per_group[group] = per_group.get(group, 0.0) + share[class_id]
    variance = target * (1 - target)
    calibration = sum(weight ** 2 * variance / (counts[g] if g >= 0 else scorer.ranks.counts[-1])
                      for g, weight in per_group.items())
    return float(np.sqrt(calibration + variance / len(classes)))


def resplit_rates(store_path: Path, passed: dict, resplits: int, targets=TARGETS, test: dict | None = None) -> dict:
    """Per target: (resplits,) realised rates on the pseudo-test halves and their predicted SDs;
    with ``test`` (a :func:`split_pass` of the test split), its (resplits,) rates too."""
    items = np.unique(passed["item"])
    rates = {t: [] for t in targets}
    test_rates = {t: [] for t in targets}
    predicted = {t: [] for t in targets}
    ties = []
    with tempfile.TemporaryDirectory(prefix="resplit-") as scratch:
        store = load_store(shutil.copytree(store_path, Path(scratch) / "store"))
        for seed in range(resplits):
            chosen = np.random.default_rng(seed).permutation(items)[: len(items) // 2]
            fit = np.isin(passed["item"], chosen)
            for target in targets:
                calibration = calibrate(store, passed["alpha"][fit], passed["predicted"][fit], target_fpr=target)
                save_calibration(store, calibration)
                scorer = Scorer(store)
                held = passed["predicted"][~fit]
                rates[target].append(float(scorer.score(passed["alpha"][~fit], held).anomalous.mean()))
                predicted[target].append(predicted_sd(scorer, held, target))
                if test is not None:
                    test_rates[target].append(float(scorer.score(test["alpha"], test["predicted"]).anomalous.mean()))
                if target == 0.01:
                    part_b = split_parts(passed["predicted"][fit])
                    combined = scorer.score(passed["alpha"][fit][part_b], passed["predicted"][fit][part_b]).statistics[:, -1]
                    ties.append(1 - len(np.unique(combined)) / len(combined))
    return {"rates": {t: np.array(v) for t, v in rates.items()}, "test_rates": {t: np.array(v) for t, v in test_rates.items()},
            "predicted_sd": {t: float(np.mean(v)) for t, v in predicted.items()},
            "tied_share": float(np.mean(ties)) if ties else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-size", type=int, default=4018, help="val composites (4018: the split's item pool)")
    parser.add_argument("--resplits", type=int, default=40, help="seeded item permutations")
    parser.add_argument("--cache", type=Path, help=".npz keeping the val pass between runs")
    parser.add_argument("--store", type=Path, help="store folder (default: the committed demo image store)")
    parser.add_argument("--test-size", type=int, default=0, help="test images each calibration also scores (0: none)")
    parser.add_argument("--test-cache", type=Path, help=".npz keeping the test pass between runs")
    args = parser.parse_args(argv)
    from explainserve.commands.archive import demo_store

    store_path = args.store or demo_store("image")[0]
    passed = split_pass(args.val_size, args.cache)
    test = split_pass(args.test_size, args.test_cache, "test") if args.test_size else None
    result = resplit_rates(store_path, passed, args.resplits, test=test)
    half = len(passed["predicted"]) // 2
    print(f"val_composites={len(passed['predicted'])} items={len(np.unique(passed['item']))} "
          f"pseudo_test_images~{half} resplits={args.resplits}")
    for target, rates in result["rates"].items():
        print(f"target={100 * target:g}% min_class_count={default_min_class_count(target)} "
              f"realised_mean_percent={100 * rates.mean():.3f} realised_sd_percent={100 * rates.std(ddof=1):.3f} "
              f"predicted_sd_percent={100 * result['predicted_sd'][target]:.3f} "
              f"mean_se_percent={100 * rates.std(ddof=1) / np.sqrt(len(rates)):.3f}")
    if test is not None:
        for target, rates in result["test_rates"].items():
            pseudo = result["rates"][target]
            draw_se = np.sqrt(target * (1 - target) / len(test["predicted"]))
            gap_se = np.sqrt(draw_se ** 2 + pseudo.var(ddof=1) / len(pseudo))
            gap = rates.mean() - pseudo.mean()
            print(f"target={100 * target:g}% test_images={len(test['predicted'])} "
                  f"test_realised_mean_percent={100 * rates.mean():.3f} test_realised_sd_percent={100 * rates.std(ddof=1):.3f} "
                  f"test_minus_pseudo_test_percent={100 * gap:.3f} gap_se_percent={100 * gap_se:.3f} "
                  f"val_test_difference={'yes' if abs(gap) > 2 * gap_se else 'no'}")
    print(f"combined_statistic_tied_share_part_b={result['tied_share']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
