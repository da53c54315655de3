"""The evaluation harness behind ``make bench``: writes bench/REPORT.md and its figures.

Runs the thesis's experiments on a demo image model (FashionScenes test split) and, with the
64 px model, the video model (MovingFashion test split), next to LIME, Integrated Gradients,
Grad-CAM++, ScoreCAM and the other baselines, on fixed, seeded subsets. Two modes:

- full (default): Tables 1-2 on 500 test images (LIME, ScoreCAM and AblationCAM, 1000 forward
  passes or more per image, on the first 100) and Table 3 on 200 clips, enough for the paired
  bootstrap intervals of the thesis's orderings to decide most of them;
- ``--quick``: tens of images, for developing the harness; its verdicts are mostly undecided.

Before computing anything the run writes ``PREREGISTRATION.md`` (methods, metrics, the orderings
of ``bench/eval_claims.py``, ``table1_images=N``, ``table3_clips=M``), which the report quotes.
The wc/wg grid search runs on the validation split, so the weights are not chosen on the
images they are scored on.

After the grid search the other sections run in two processes side by side (``--jobs 2``, the
default), each on one torch thread, as tasks of a section or of one method handed out longest
section first to whichever process is free (``bench/eval_schedule.py``); ``--jobs 1`` runs them
one after another in this process, with the same numbers. Table 5's timing runs alone
after them, since it measures latency. Each run prints ``bench_full_estimate_min=X``: the full
mode's wall time extrapolated from this run's per-sample section times, for this schedule.

Usage: python bench/evaluate.py [--quick] [--jobs 1|2] [--model image|image_large] [--image-n N] ... [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import eval_claims, eval_ood, eval_plots, eval_report, eval_schedule, eval_sections, eval_suppression  # noqa: E402
from bench.eval_methods import COSTLY, image_methods, video_methods  # noqa: E402
from bench.eval_subjects import load_subject  # noqa: E402

GALLERY = ("Grad-CAM", "Jitter-CAM", "SWAG_I", "SWAG_G", "SWAG_I+G", "LIME-1000")
# Sample sizes per mode; an explicit option overrides its entry. Sections whose cost grows with
# a size are extrapolated from a run to the full mode by that size (FULL_ESTIMATE).
SIZES = {
    "full": {"image_n": 500, "costly_n": 100, "video_n": 200, "grid_n": 12, "filter_n": 400, "ranking_n": 16,
             "timing_n": 5, "ood_test_n": 4000, "ood_n": 2000, "ood_shift_n": 2000, "ood_fit_n": 2000,
             "suppression_n": 4000},
    "quick": {"image_n": 32, "costly_n": 16, "video_n": 16, "grid_n": 12, "filter_n": 200, "ranking_n": 16,
              "timing_n": 5, "ood_test_n": 1000, "ood_n": 500, "ood_shift_n": 500, "ood_fit_n": 1000,
              "suppression_n": 1000},
}
FULL_ESTIMATE = {"grid search": "grid_n", "image methods": "image_n", "costly image methods": "costly_n",
                 "timing": "timing_n", "filter removal": "filter_n", "superpixel ranking": "ranking_n",
                 "video methods": "video_n", "OOD detection": "ood_test_n", "surprise suppression": "suppression_n"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="development sizes (see SIZES); verdicts mostly undecided")
    parser.add_argument("--no-store-tables", action="store_true",
                        help="leave out Tables 7 and 8 (they need the distribution store; bench-ood and "
                             "bench-suppression run them alone)")
    parser.add_argument("--random-init", action="store_true",
                        help="random-init demo architectures instead of the trained weights (harness smoke run)")
    eval_ood.add_model_argument(parser)
    for name, help_text in (("image_n", "FashionScenes test images for Tables 1-2"),
                            ("costly_n", "the first N of those for LIME, ScoreCAM and AblationCAM"),
                            ("grid_n", "FashionScenes val images for the wc/wg grid"),
                            ("ranking_n", "test images for Table 6 (superpixel ranking)"),
                            ("filter_n", "test images for Table 4 (filter removal)"),
                            ("timing_n", "test images timed one by one for Table 5"),
                            ("video_n", "MovingFashion test clips for Table 3")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{help_text} (default: the mode's)")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="processes for the sections after the grid search (1: in this process, for debugging)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="report folder")
    eval_ood.add_arguments(parser)
    eval_suppression.add_arguments(parser)
    parser.set_defaults(**{name: None for name in SIZES["full"]})  # the mode decides what is not given
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for name, value in SIZES[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("image_n", "grid_n", "ranking_n", "filter_n", "timing_n", "video_n", "costly_n"):
        if getattr(args, name) < 2:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 2")
    args.costly_n = min(args.costly_n, args.image_n)
    return args


def full_estimate_minutes(durations: dict, args, schedule: dict) -> float:
    """The full mode's wall minutes, each size-dependent section scaled from this run by its size.

    Sections outside ``schedule["tasks"]`` add up; the tasks, each scaled by its section's size,
    are handed out to ``schedule["jobs"]`` processes in order, as the run hands them out.
    """
    def factor(section: str) -> float:
        size = FULL_ESTIMATE.get(section)
        return SIZES["full"][size] / getattr(args, size) if size else 1.0

    sections = {name.split(": ")[0] for name, _ in schedule["tasks"]}
    serial = sum(seconds * factor(name) for name, seconds in durations.items()
                 if name != "total" and name not in sections)
    scaled = [seconds * factor(name.split(": ")[0]) for name, seconds in schedule["tasks"]]
    return (serial + eval_schedule.list_schedule_seconds(scaled, schedule["jobs"])) / 60


def load_clips(args, results: dict):
    """The video subject, or None (saying why in ``results``) with another image model or no video weights."""
    try:
        if args.model != "image":
            raise FileNotFoundError(f"the video model is evaluated beside the 64 px image model (--model image), "
                                    f"not with --model {args.model}")
        return load_subject("video", "test", args.video_n, random_init=args.random_init)
    except FileNotFoundError as error:  # the video model is trained separately; say so instead of failing
        print(f"Table 3 skipped: {error}", flush=True)
        results["video_missing"] = str(error)
        return None


def record_video(args, clips, table3: dict, results: dict) -> None:
    """Table 3 and its deletion curves on the video model."""
    results["video_model"] = clips.name
    results["video_segments"] = clips.explainer.limits.default_n_segments
    results["video"] = table3
    results["video_accuracy"] = float((eval_sections.predicted(clips, np.arange(args.video_n)).numpy()
                                       == clips.labels).mean())
    eval_plots.curves_png(args.out / "deletion_curves_video.png",
                          {label: r["deletion_curve"] for label, r in table3.items()},
                          f"MovingFashion deletion (mean of {args.video_n} clips)", "fraction of voxels removed",
                          "softmax of the predicted class")


PREREGISTRATION = "PREREGISTRATION.md"


def preregister(args, images, clips) -> None:
    """Write the methods, metrics, orderings and sizes to ``PREREGISTRATION.md`` before any result."""
    text = eval_claims.preregistration(
        created=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        models=f"{images.name} ({args.model}, input {'x'.join(map(str, images.explainer.input_size))}, "
               f"{images.explainer.num_filters} filters at {images.explainer.layer})"
               + (f"; {clips.name} (video, input {'x'.join(map(str, clips.explainer.input_size))})" if clips else ""),
        image_methods=[m.label for m in image_methods(images, 0.0, 0.0)],
        video_methods=[m.label for m in video_methods(clips)] if clips is not None else ["not run here"],
        costly=COSTLY, sizes=dict(vars(args), video_n=args.video_n if clips is not None else 0), mode=args.mode,
        segments=f"image {images.explainer.limits.default_n_segments} at "
                 f"{'x'.join(map(str, images.explainer.input_size))}"
                 + (f", video {clips.explainer.limits.default_n_segments} at "
                    f"{'x'.join(map(str, clips.explainer.input_size))}" if clips else ""),
    )
    (args.out / PREREGISTRATION).write_text(text)
    print(text, flush=True)


def side_by_side_sections(args, clips) -> set[str]:
    """The sections after the grid search, but Table 5's timing, that this run makes."""
    left_out = set() if clips is not None else {"video methods"}
    if args.random_init or args.no_store_tables:
        left_out |= {"OOD detection", "surprise suppression"}
    return set(eval_schedule.SECTION_ORDER) - left_out


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
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

    images = load_subject(args.model, "test", eval_schedule.n_images(args), random_init=args.random_init)
    results["image_model"] = images.name
    results["image_segments"] = images.explainer.limits.default_n_segments
    clips = load_clips(args, results)
    preregister(args, images, clips)
    grid_subject = load_subject(args.model, "val", args.grid_n, random_init=args.random_init)
    grid_subject.model, grid_subject.explainer = images.model, images.explainer
    grid = timed("grid search", eval_sections.grid_search, grid_subject, np.arange(args.grid_n))
    results["grid"] = grid
    eval_plots.grid_png(args.out / "grid_wc_wg.png", eval_sections.GRID, eval_sections.GRID, grid["auc"], grid["winner"])

    methods = image_methods(images, *grid["winner"])
    todo = eval_schedule.tasks(side_by_side_sections(args, clips), [m.label for m in methods],
                               [m.label for m in video_methods(clips)] if clips is not None else [])
    sections, seconds, results["schedule"] = eval_schedule.run_tasks(todo, args, grid["winner"], args.jobs)
    durations.update(seconds)

    table1 = {**sections["image methods"], **sections["costly image methods"]}
    table1 = {m.label: table1[m.label] for m in methods}
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
    shown = min(8, args.costly_n)  # LIME-1000, shown too, ran on the first costly_n
    eval_plots.gallery_png(args.out / "gallery.png", images.samples[:shown],
                           {label: table1[label]["maps"][:shown] for label in gallery_labels},
                           [images.explainer.class_names[c] for c in images.labels[:shown]])

    # Table 5 measures latency: it runs alone, after the side-by-side sections, on 2 threads.
    torch.set_num_threads(2)
    results["cost"] = timed("timing", eval_sections.costs, images, np.arange(args.timing_n), methods)
    results["filters"] = sections["filter removal"]
    eval_plots.curves_png(args.out / "filter_removal.png",
                          {r: v["curve"] for r, v in results["filters"].items() if isinstance(v, dict)},
                          f"Filter removal, {images.explainer.layer} ({args.filter_n} images)",
                          "fraction of filters removed", "normalised accuracy")
    results["ranking"] = sections["superpixel ranking"]
    if clips is not None:
        record_video(args, clips, sections["video methods"], results)
    for key, name in (("ood", "OOD detection"), ("suppression", "surprise suppression")):
        results[key] = sections.get(name) or {
            "missing": "random-init models have no distribution store." if args.random_init
            else "left out of this run (--no-store-tables)."}

    durations["total"] = time.perf_counter() - started
    results["durations"] = durations
    results["full_estimate_min"] = full_estimate_minutes(durations, args, results["schedule"])
    results["load_average"] = (load_before, os.getloadavg())
    results["preregistration"] = (args.out / PREREGISTRATION).read_text()
    results["claims"] = eval_claims.judge(results)
    (args.out / "REPORT.md").write_text(eval_report.render(results))
    print(f"wrote {args.out / 'REPORT.md'} in {durations['total'] / 60:.1f} min")
    print(f"bench_full_estimate_min={results['full_estimate_min']:.1f}")
    for entry in results["claims"]:
        print(f"claim_{entry['claim'].key}={entry['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
