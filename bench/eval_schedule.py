"""The evaluation's sections after the wc/wg grid search, as tasks shared out to two processes.

A task is one section, or one method of a section that compares methods (Tables 1-3): the
method sections are long (LIME, ScoreCAM and AblationCAM together took 26 of the 78 minutes of the
one-process full run of 2026-12-01), so whole sections cannot be split evenly between two
processes, and one method of them can. Tasks are handed out longest section first, each to
whichever process is free (list scheduling), which keeps the two busy until the end.

Each task is a function of the run's options and the grid's winner that loads what it needs
(once per process) and returns plain picklable results, so that a ``spawn``ed worker can run it.
Table 5 ("timing") is not one of them: it measures latency, so ``evaluate.py`` runs it alone
after these.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import eval_ood, eval_sections, eval_suppression
from bench.eval_methods import COSTLY, image_methods, video_methods
from bench.eval_subjects import load_subject
from explainserve.anomaly import StoreError

# Longest first, by the section times of the one-process full run of 2026-12-01 (minutes):
# costly image methods 26.3, video methods 21.7, image methods 16.8, superpixel ranking 6.6,
# OOD detection 2.7, filter removal 1.3, surprise suppression 0.4.
SECTION_ORDER = ("costly image methods", "video methods", "image methods", "superpixel ranking", "OOD detection",
                 "filter removal", "surprise suppression")
METHOD_SECTIONS = ("costly image methods", "video methods", "image methods")


@dataclass(frozen=True)
class Task:
    """One section of the evaluation, or one ``method`` (its label) of a method section."""

    section: str
    method: str | None = None

    @property
    def name(self) -> str:
        return f"{self.section}: {self.method}" if self.method else self.section


def n_images(args) -> int:
    """Test images loaded for Tables 1-2, 4, 5 and 6 (the first N of the split serve them all)."""
    return max(args.image_n, args.ranking_n, args.filter_n, args.timing_n)


@functools.lru_cache(maxsize=1)
def _images(model: str, size: int, random_init: bool):
    return load_subject(model, "test", size, random_init=random_init)


@functools.lru_cache(maxsize=1)
def _clips(size: int, random_init: bool):
    return load_subject("video", "test", size, random_init=random_init)


@functools.lru_cache(maxsize=3)
def _predicted(model: str, size: int, n: int, random_init: bool) -> torch.Tensor:
    """The classes predicted on the first ``n`` samples of ``model``'s subject (``video``: the
    clips), computed once per process for all the method tasks that explain them."""
    subject = _clips(size, random_init) if model == "video" else _images(model, size, random_init)
    return eval_sections.predicted(subject, np.arange(n))


def _method_table(args, winner, task: Task) -> dict:
    """``compare_methods`` of the one method ``task.method`` of ``task.section``."""
    if task.section == "video methods":
        model, size, n = "video", args.video_n, args.video_n
        subject = _clips(size, args.random_init)
        methods = video_methods(subject)
    else:
        model, size = args.model, n_images(args)
        subject = _images(model, size, args.random_init)
        methods = image_methods(subject, *winner)
        n = args.costly_n if task.section == "costly image methods" else args.image_n
    (method,) = [m for m in methods if m.label == task.method]
    return eval_sections.compare_methods(subject, np.arange(n), [method],
                                         targets=_predicted(model, size, n, args.random_init))


def _store_table(module, args) -> dict:
    try:
        return module.run(args)
    except (FileNotFoundError, StoreError) as error:  # no committed store: say so instead of failing
        print(f"{module.__name__} skipped: {error}", flush=True)
        return {"missing": str(error)}


SECTIONS = {
    "filter removal": lambda args: eval_sections.filter_removal(
        _images(args.model, n_images(args), args.random_init), np.arange(args.filter_n)),
    "superpixel ranking": lambda args: eval_sections.superpixel_ranking(
        _images(args.model, n_images(args), args.random_init), np.arange(args.ranking_n)),
    "OOD detection": functools.partial(_store_table, eval_ood),
    "surprise suppression": functools.partial(_store_table, eval_suppression),
}


def tasks(sections, image_labels, video_labels) -> list[Task]:
    """The tasks of ``sections`` in SECTION_ORDER, a task per method label in the method sections
    (images: the costly ones, ``COSTLY``, apart from the others)."""
    labels = {"costly image methods": [label for label in image_labels if label in COSTLY],
              "image methods": [label for label in image_labels if label not in COSTLY],
              "video methods": list(video_labels)}
    return [Task(section, method) for section in SECTION_ORDER if section in sections
            for method in (labels[section] if section in METHOD_SECTIONS else [None])]


def run_task(task: Task, args, winner) -> tuple[object, float, int, float, float]:
    """Run ``task`` on one torch thread, seeded, so that its numbers depend on nothing run before it.

    Returns
    -------
    (result, seconds, pid, start, end) : the task's result, its seconds (loading included), and
    the process and wall-clock span it ran in (``time.time()``).
    """
    # One thread whether in a worker or in-process (--jobs 1), so both give the same numbers.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    start, t0 = time.time(), time.perf_counter()
    result = (_method_table(args, winner, task) if task.method else SECTIONS[task.section](args))
    seconds = time.perf_counter() - t0
    print(f"[{task.name}] {seconds:.0f} s", flush=True)
    return result, seconds, os.getpid(), start, time.time()


def run_tasks(todo: list[Task], args, winner, jobs: int) -> tuple[dict, dict, dict]:
    """Run ``todo`` in order: handed out to ``jobs`` ``spawn``ed processes as each comes free with
    ``jobs`` > 1 (fork after torch's thread pools have started can hang), else in this process.

    Returns
    -------
    (sections, seconds, schedule) : each section's results (method sections: one dict entry per
    method, in ``todo``'s order) and seconds (the sum of its tasks') by name, and the schedule:
    ``jobs``, ``tasks`` (name, seconds) in order, ``groups`` (task names per process) and
    ``walls`` (each process's span, seconds).
    """
    if jobs == 1:
        outcomes = [run_task(task, args, winner) for task in todo]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            outcomes = [f.result() for f in [pool.submit(run_task, task, args, winner) for task in todo]]
    sections, seconds, spans = {}, {}, {}
    for task, (result, task_seconds, pid, start, end) in zip(todo, outcomes):
        if task.method:
            sections.setdefault(task.section, {}).update(result)
        else:
            sections[task.section] = result
        seconds[task.section] = seconds.get(task.section, 0.0) + task_seconds
        names, first, last = spans.get(pid, ([], start, end))
        spans[pid] = (names + [task.name], min(first, start), max(last, end))
    schedule = {"jobs": jobs, "tasks": [(task.name, outcome[1]) for task, outcome in zip(todo, outcomes)],
                "groups": [names for names, _, _ in spans.values()],
                "walls": [last - first for _, first, last in spans.values()]}
    return sections, seconds, schedule


def list_schedule_seconds(seconds, workers: int) -> float:
    """The wall seconds of running tasks of ``seconds`` in order, each on whichever of ``workers``
    is free first (how ``run_tasks`` hands them out)."""
    free_at = [0.0] * workers
    for value in seconds:
        earliest = free_at.index(min(free_at))
        free_at[earliest] += value
    return max(free_at)
