"""The evaluation's sections after the wc/wg grid search, run in two processes side by side.

Each section is a function of the run's options and the grid's winner that loads what it needs
and returns plain picklable results (numpy arrays, tensors, dicts), so that a ``spawn``ed worker
can run it. Table 5 ("timing") is not one of them: it measures latency, so ``evaluate.py`` runs
it alone after these.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import time

import numpy as np
import torch

from bench import eval_ood, eval_sections, eval_suppression
from bench.eval_methods import COSTLY, image_methods, video_methods
from bench.eval_subjects import load_subject
from explainserve.anomaly import StoreError

# Two groups of about equal time, from the section times of the full run of 2026-12-01 (one
# process each): 26.3 + 6.6 + 1.3 + 2.7 + 0.4 = 37.3 min and 16.8 + 21.7 = 38.5 min.
GROUPS = (("costly image methods", "superpixel ranking", "filter removal", "OOD detection", "surprise suppression"),
          ("image methods", "video methods"))


def n_images(args) -> int:
    """Test images loaded for Tables 1-2, 4, 5 and 6 (the first N of the split serve them all)."""
    return max(args.image_n, args.ranking_n, args.filter_n, args.timing_n)


@functools.lru_cache(maxsize=1)
def _images(model: str, size: int, random_init: bool):
    return load_subject(model, "test", size, random_init=random_init)


def _image_methods(args, winner, costly: bool) -> dict:
    images = _images(args.model, n_images(args), args.random_init)
    methods = [m for m in image_methods(images, *winner) if (m.label in COSTLY) == costly]
    return eval_sections.compare_methods(images, np.arange(args.costly_n if costly else args.image_n), methods)


def _video_methods(args, winner) -> dict:
    clips = load_subject("video", "test", args.video_n, random_init=args.random_init)
    return eval_sections.compare_methods(clips, np.arange(args.video_n), video_methods(clips))


def _store_table(module, args, winner) -> dict:
    try:
        return module.run(args)
    except (FileNotFoundError, StoreError) as error:  # no committed store: say so instead of failing
        print(f"{module.__name__} skipped: {error}", flush=True)
        return {"missing": str(error)}


SECTIONS = {
    "image methods": functools.partial(_image_methods, costly=False),
    "costly image methods": functools.partial(_image_methods, costly=True),
    "filter removal": lambda args, winner: eval_sections.filter_removal(
        _images(args.model, n_images(args), args.random_init), np.arange(args.filter_n)),
    "superpixel ranking": lambda args, winner: eval_sections.superpixel_ranking(
        _images(args.model, n_images(args), args.random_init), np.arange(args.ranking_n)),
    "video methods": _video_methods,
    "OOD detection": functools.partial(_store_table, eval_ood),
    "surprise suppression": functools.partial(_store_table, eval_suppression),
}


def run_group(names, args, winner) -> tuple[dict, dict, float]:
    """Run sections ``names`` in turn on one torch thread.

    Returns
    -------
    (results, seconds, wall) : each section's results and seconds by name, and the group's wall
    seconds (sections plus loading what they need).
    """
    # One thread whether in a worker or in-process (--jobs 1), so both give the same numbers.
    torch.set_num_threads(1)
    started = time.perf_counter()
    results, seconds = {}, {}
    for name in names:
        torch.manual_seed(0)  # each section seeds itself: its numbers do not depend on what ran before
        np.random.seed(0)
        t0 = time.perf_counter()
        results[name] = SECTIONS[name](args, winner)
        seconds[name] = time.perf_counter() - t0
        print(f"[{name}] {seconds[name]:.0f} s", flush=True)
    _images.cache_clear()
    return results, seconds, time.perf_counter() - started


def run_groups(groups, args, winner, jobs: int) -> tuple[dict, dict, list[float]]:
    """Run ``groups`` of section names: each in its own ``spawn``ed process with ``jobs`` > 1
    (fork after torch's thread pools have started can hang), else one after another in-process.

    Returns
    -------
    (results, seconds, walls) : every section's results and seconds by name, and each group's
    wall seconds.
    """
    if jobs == 1:
        outcomes = [run_group(names, args, winner) for names in groups]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(groups)), mp_context=context) as pool:
            outcomes = [f.result() for f in [pool.submit(run_group, names, args, winner) for names in groups]]
    results, seconds = {}, {}
    for group_results, group_seconds, _ in outcomes:
        results.update(group_results)
        seconds.update(group_seconds)
    return results, seconds, [wall for _, _, wall in outcomes]
