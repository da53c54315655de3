"""Out-of-distribution detection on MovingFashion clips: Table 7's comparison for the demo video
model (the Grad-AMap anomaly verdict against MSP, MaxLogit, Energy, KNN, ViM, Mahalanobis,
ReAct + Energy, ASH-S, CARef and CADRef). A section of bench/REPORT.md, right after the image Table 7.

Everything but the data is bench/eval_ood.py's: the same network pass (``network_pass``: the
server's input preparation and one probe pass; alpha from ``FilterScores.of``), the verdict from
the store's ``Scorer`` against the predicted class with the committed video store, the feature
baselines of bench/ood_baselines.py from the same pass, thresholds at the store's target rate
(1 %) on val and AUROCs with 95 % percentile-bootstrap intervals (``compare``).

Settings, fixed before any result was seen (seed 0 everywhere; sizes fit ~10 minutes on the
2 shared cores):

- feature baselines fitted on the first 1,000 train clips (ReAct's threshold on the maps of
  the first 500);
- thresholds of the baselines on the first 1,500 val clips (a subset of the 5,000 the store was
  calibrated on: the verdict's val FPR is in-sample, its test FPR is not);
- negatives: the first 1,500 test clips;
- held-out backgrounds: 1,000 "ood_backgrounds" clips (test items, trained motions, held-out
  photographs);
- held-out motions: 1,000 "ood_motions" clips, reported as two sets by motion (diagonal slide,
  near; still item, far);
- shifts of the first 500 test clips: Gaussian noise σ = 0.1 of the range, colour inversion,
  Gaussian blur σ = 1.5 px (each frame, as the images' shifts), and a frame shuffle
  (:func:`frame_shuffle`: same frames, motion destroyed).

``python bench/eval_ood_video.py`` rewrites only its section of bench/REPORT.md (and keeps a
copy in bench/OOD_VIDEO.md, which the full report includes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.eval_ood import (ALPHA_EXTENDED, ALPHA_ONLY, CAREF, COUNTS, EXTENDED, HEADING as IMAGE_HEADING, REPORT, SHIFTS, comparison_rows,  # noqa: E402
                            compare, network_pass, open_model, splice, summary_lines)

HEADING = "## Table 7, clips: out-of-distribution detection (MovingFashion; Grad-AMap verdict vs logit and feature baselines)"
COPY = Path(__file__).resolve().parent / "OOD_VIDEO.md"
NOTES = Path(__file__).resolve().parent / "ood_video_notes.md"
SIZES = {"fit": 1000, "react_maps": 500, "val": 1500, "test": 1500, "ood_backgrounds": 1000, "ood_motions": 1000,
         "shift": 500}
BATCH_SIZE = 32
RESAMPLES = 200
SEED = 0


def frame_shuffle(clips: np.ndarray) -> np.ndarray:
    """Clips (N, T, H, W, 3) with their frames in a seeded random order, never the original one.

    Each frame is unchanged (same item, same photograph, same pixels), only their order is: a
    slide jumps back and forth instead of moving one way, so the motion no class describes.
    """
    rng = np.random.default_rng(SEED)
    frames = clips.shape[1]
    orders = np.empty((len(clips), frames), dtype=np.int64)
    for i in range(len(clips)):
        orders[i] = rng.permutation(frames)
        while (orders[i] == np.arange(frames)).all():
            orders[i] = rng.permutation(frames)
    return np.take_along_axis(clips, orders[:, :, None, None, None], axis=1)


CLIP_SHIFTS = {**SHIFTS, "frame shuffle": frame_shuffle}


def subset(passed: dict, keep: np.ndarray) -> dict:
    """The rows ``keep`` (bool (n,)) of a :func:`network_pass` result."""
    return {key: ({name: value[keep] for name, value in passed[key].items()} if key == "scores" else passed[key][keep])
            for key in ("logits", "predicted", "alpha", "features", "scores")}


def run(batch_size: int = BATCH_SIZE) -> dict:
    """Every number of the section (a plain dict)."""
    from bench.ood_baselines import FeatureBaselines
    from explainserve.data import OOD_MOTIONS, MovingFashion

    torch.set_num_threads(2)
    started, load_before = time.perf_counter(), os.getloadavg()
    explainer, store = open_model("video")

    def clips(split: str, size: int):
        return MovingFashion(split, seed=SEED, size=size, image_size=explainer.input_size[-1])

    fit = clips("train", SIZES["fit"]).batch()
    fitted = network_pass(explainer, fit.clips, batch_size, "fit", keep_maps=SIZES["react_maps"])
    baselines = FeatureBaselines(explainer.model.classifier, fitted["features"], fit.labels, fitted["maps"])
    del fit, fitted
    val, test = clips("val", SIZES["val"]).batch(), clips("test", SIZES["test"]).batch()
    backgrounds = clips("ood_backgrounds", SIZES["ood_backgrounds"]).batch()
    motions = list(clips("ood_motions", SIZES["ood_motions"]))
    motion_names = np.array([sample["motion"] for sample in motions])
    passes = {"val": network_pass(explainer, val.clips, batch_size, "val", baselines),
              "test": network_pass(explainer, test.clips, batch_size, "test", baselines),
              "held-out backgrounds": network_pass(explainer, backgrounds.clips, batch_size, "backgrounds", baselines)}
    moving = network_pass(explainer, np.stack([sample["clip"] for sample in motions]), batch_size, "motions", baselines)
    del motions
    for motion in OOD_MOTIONS:
        passes[f"held-out motion: {motion}"] = subset(moving, motion_names == motion)
    labels = {"val": val.labels, "test": test.labels, "held-out backgrounds": backgrounds.labels}
    for name, shift in CLIP_SHIFTS.items():
        passes[name] = network_pass(explainer, shift(test.clips[:SIZES["shift"]]), batch_size, name, baselines)
        labels[name] = test.labels[:SIZES["shift"]]
    sets = [name for name in passes if name not in ("val", "test")]
    compared = compare(store, passes, sets, RESAMPLES)
    return {
        "table": compared["table"], "sets": sets, "baselines": list(compared["baselines"]),
        **{key: compared[key] for key in COUNTS},
        "accuracy": {name: float((passes[name]["predicted"] == y).mean()) for name, y in labels.items()},
        "tests": {name: compared["scored"][name][1].tests.mean(axis=0).tolist() for name in ("test", *sets)},
        "test_names": list(compared["scored"]["test"][1].test_names),
        "sizes": {**SIZES, **{name: len(passes[name]["predicted"]) for name in passes}},
        "target_fpr": store.calibration["target_fpr"], "store_sha256": store.sha256, "num_classes": store.num_classes,
        "num_filters": store.meta.num_filters, "calibration_images": store.calibration["held_out_images"],
        "load": (load_before[0], os.getloadavg()[0]), "seconds": time.perf_counter() - started,
    }


def section(r: dict) -> list[str]:
    """The report section as Markdown lines."""
    sets, s, percent = r["sets"], r["sizes"], 100 * r["target_fpr"]
    return [HEADING, "",
            f"Demo video model (MotionC3D, 16 × 64 × 64 clips, {r['num_classes']} motions) scored against its predicted "
            f"class with the committed store (sha256 {r['store_sha256'][:12]}, {r['num_filters']} filters at the "
            f"target layer, calibrated on {r['calibration_images']} val clips). Settings fixed before any result "
            f"(bench/eval_ood_video.py's docstring): feature baselines fitted on {s['fit']} train clips; the "
            f"baselines' thresholds flag at most {percent:g} % of the first {s['val']} val clips; negatives "
            f"{s['test']} test clips; positives: " + ", ".join(f"{name} {s[name]}" for name in sets)
            + f" (the shifts are of the first {s['shift']} test clips; the two held-out motions share the "
            f"{s['ood_motions']} ood_motions clips). Seed 0; {RESAMPLES} bootstrap resamples. "
            f"`python bench/eval_ood_video.py`: {r['seconds'] / 60:.1f} min on 2 shared cores, load average "
            f"{r['load'][0]:.1f} at the start and {r['load'][1]:.1f} at the end.",
            "",
            "Cells as in the image table: AUROC [95 % bootstrap interval] / TPR % at the calibrated threshold. "
            f"Rows below the served verdict (five tests on the alpha and pooled features of one pass): the "
            f"verdict from alpha alone ({ALPHA_ONLY}), the five tests alone, then the alpha-only verdict with the "
            f"logits' energy as a fourth test ({EXTENDED}, bench/ood_extended.py, calibrated here on the {s['val']} "
            f"val clips; not served), with the alpha-Mahalanobis distance ({ALPHA_EXTENDED}; not served), and the "
            f"five tests with CARef's relative deviation as a sixth ({CAREF}, bench/ood_caref_verdict.py; not served).",
            ""] + comparison_rows(r) + [
        "Model accuracy: " + ", ".join(f"{name} {100 * value:.1f} %" for name, value in r["accuracy"].items())
        + " (the held-out motions have no label among the model's classes).", "",
        "Which tests the ANOMALOUS verdicts name (% of clips; " + " / ".join(r["test_names"]) + "): "
        + "; ".join(f"{name} {' / '.join(f'{100 * v:.1f}' for v in values)}" for name, values in r["tests"].items())
        + ".", ""] + (["### Reading", "", NOTES.read_text().strip(), ""] if NOTES.exists() else [])


def place(report: str, lines: list[str]) -> str:
    """``report`` with the section replaced, or inserted right after the image Table 7 section."""
    if HEADING in report or IMAGE_HEADING not in report:
        return splice(report, lines, HEADING)
    start = report.index(IMAGE_HEADING)
    end = report.find("\n## ", start + len(IMAGE_HEADING))
    end = len(report) if end < 0 else end + 1
    return report[:end].rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + report[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="clips per network pass (no effect on results)")
    parser.add_argument("--out", type=Path, default=REPORT, help="report whose clip Table 7 section is rewritten")
    args = parser.parse_args(argv)
    results = run(args.batch_size)
    lines = section(results)
    print("\n".join(lines))
    args.out.write_text(place(args.out.read_text() if args.out.exists() else "", lines))
    COPY.write_text("\n".join(lines) + "\n")
    print(f"wrote the section into {args.out} and {COPY}")
    print("\n".join(summary_lines(results, prefix="video_")))
    print(f"video_eval_minutes={results['seconds'] / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
