"""The evaluation harness behind ``make bench``: writes bench/REPORT.md and its figures.

Runs the thesis's experiments on the demo models (FashionScenes test split for images,
MovingFashion test split for clips) next to LIME, Integrated Gradients, Grad-CAM++, ScoreCAM
and the other baselines, on fixed, seeded subsets whose sizes are the options below and are
printed in the report. The sizes keep ``make bench`` near 30 minutes on 2 shared CPU cores:
forward passes dominate (LIME-1000 alone is 1000 per image), so the LIME-heavy tables use tens
of images; standard errors are reported so that the reader can judge the differences. The
wc/wg grid search runs on the validation split, so the weights are not chosen on the images
they are scored on.

Usage: python bench/evaluate.py [--random-init] [--image-n N] ... [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import eval_ood, eval_plots, eval_report, eval_sections, eval_suppression  # noqa: E402
from bench.eval_methods import image_methods, video_methods  # noqa: E402
from bench.eval_subjects import load_subject  # noqa: E402
from explainserve.anomaly import StoreError  # noqa: E402

GALLERY = ("Grad-CAM", "Jitter-CAM", "SWAG_I", "SWAG_G", "SWAG_I+G", "LIME-1000")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-init", action="store_true",
                        help="random-init torchvision models instead of the trained demo models (harness smoke run)")
    parser.add_argument("--image-n", type=int, default=32, help="FashionScenes test images for Tables 1-2")
    parser.add_argument("--grid-n", type=int, default=12, help="FashionScenes val images for the wc/wg grid")
    parser.add_argument("--ranking-n", type=int, default=16, help="test images for Table 6 (superpixel ranking)")
    parser.add_argument("--filter-n", type=int, default=400, help="test images for Table 4 (filter removal)")
    parser.add_argument("--timing-n", type=int, default=5, help="test images timed one by one for Table 5")
    parser.add_argument("--video-n", type=int, default=16, help="MovingFashion test clips for Table 3")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="report folder")
    eval_ood.add_arguments(parser)
    eval_suppression.add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("image_n", "grid_n", "ranking_n", "filter_n", "timing_n", "video_n"):
        if getattr(args, name) < 2:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 2")
    return args


def run_video(args, clips, results: dict, timed) -> None:
    """Table 3 and its deletion curves on the video model."""
    results["video_model"] = clips.name
    table3 = timed("video methods", eval_sections.compare_methods, clips, np.arange(args.video_n), video_methods(clips))
    results["video"] = table3
    results["video_accuracy"] = float((eval_sections.predicted(clips, np.arange(args.video_n)).numpy()
                                       == clips.labels).mean())
    eval_plots.curves_png(args.out / "deletion_curves_video.png",
                          {label: r["deletion_curve"] for label, r in table3.items()},
                          f"MovingFashion deletion (mean of {args.video_n} clips)", "fraction of voxels removed",
                          "softmax of the predicted class")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    durations = {}
    results = {"args": vars(args), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    args.out.mkdir(parents=True, exist_ok=True)

    def timed(name, function, *arguments):
        t0 = time.perf_counter()
        value = function(*arguments)
        durations[name] = time.perf_counter() - t0
        print(f"[{name}] {durations[name]:.0f} s", flush=True)
        return value

    n_image = max(args.image_n, args.ranking_n, args.filter_n, args.timing_n)
    images = load_subject("image", "test", n_image, random_init=args.random_init)
    results["image_model"] = images.name
    results["image_segments"] = images.explainer.limits.default_n_segments
    grid_subject = load_subject("image", "val", args.grid_n, random_init=args.random_init)
    grid_subject.model, grid_subject.explainer = images.model, images.explainer
    grid = timed("grid search", eval_sections.grid_search, grid_subject, np.arange(args.grid_n))
    results["grid"] = grid
    eval_plots.grid_png(args.out / "grid_wc_wg.png", eval_sections.GRID, eval_sections.GRID, grid["auc"], grid["winner"])

    methods = image_methods(images, *grid["winner"])
    table1 = timed("image methods", eval_sections.compare_methods, images, np.arange(args.image_n), methods)
    results["image"] = table1
    results["image_accuracy"] = float((eval_sections.predicted(images, np.arange(args.image_n)).numpy()
                                       == images.labels[: args.image_n]).mean())
    for mode in ("deletion", "insertion"):
        eval_plots.curves_png(args.out / f"{mode}_curves_image.png",
                              {label: r[f"{mode}_curve"] for label, r in table1.items()},
                              f"FashionScenes {mode} (mean of {args.image_n} images)",
                              f"fraction of pixels {'removed' if mode == 'deletion' else 'inserted'}",
                              "softmax of the predicted class")
    gallery_labels = [label for label in GALLERY if label in table1]
    shown = min(8, args.image_n)
    eval_plots.gallery_png(args.out / "gallery.png", images.samples[:shown],
                           {label: table1[label]["maps"][:shown] for label in gallery_labels},
                           [images.explainer.class_names[c] for c in images.labels[:shown]])

    results["cost"] = timed("timing", eval_sections.costs, images, np.arange(args.timing_n), methods)
    results["filters"] = timed("filter removal", eval_sections.filter_removal, images, np.arange(args.filter_n))
    eval_plots.curves_png(args.out / "filter_removal.png",
                          {r: v["curve"] for r, v in results["filters"].items() if isinstance(v, dict)},
                          f"Filter removal, {images.explainer.layer} ({args.filter_n} images)",
                          "fraction of filters removed", "normalised accuracy")
    results["ranking"] = timed("superpixel ranking", eval_sections.superpixel_ranking, images,
                               np.arange(args.ranking_n))

    try:
        clips = load_subject("video", "test", args.video_n, random_init=args.random_init)
    except FileNotFoundError as error:  # the video model is trained separately; say so instead of failing
        print(f"Table 3 skipped: {error}", flush=True)
        results["video_missing"] = str(error)
    else:
        run_video(args, clips, results, timed)

    for key, table, name, module in (("ood", "Table 7", "OOD detection", eval_ood),
                                     ("suppression", "Table 8", "surprise suppression", eval_suppression)):
        if args.random_init:
            results[key] = {"missing": "random-init models have no distribution store."}
            continue
        try:
            results[key] = timed(name, module.run, args)
        except (FileNotFoundError, StoreError) as error:  # no committed store: say so instead of failing
            print(f"{table} skipped: {error}", flush=True)
            results[key] = {"missing": str(error)}

    durations["total"] = time.perf_counter() - started
    results["durations"] = durations
    (args.out / "REPORT.md").write_text(eval_report.render(results))
    print(f"wrote {args.out / 'REPORT.md'} in {durations['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
