"""bench/evaluate.py's schedule: every section (a task per method in the method sections) runs
once, and the full-mode estimate is the wall time of handing the scaled tasks out to the
processes as the run does, not the sum of the sections."""

import argparse

import pytest

from bench import eval_schedule, evaluate
from bench.eval_methods import COSTLY

SIDE_BY_SIDE = set(evaluate.FULL_ESTIMATE) - {"grid search", "timing"}
IMAGE_LABELS = ["Grad-CAM", "SWAG_I", "ScoreCAM", "LIME-1000"]
VIDEO_LABELS = ["SWAG-V_I", "Grad-CAM"]


def test_the_side_by_side_sections_are_every_section_after_the_grid_search_but_the_timing():
    assert set(eval_schedule.SECTION_ORDER) == SIDE_BY_SIDE
    assert set(eval_schedule.SECTIONS) | set(eval_schedule.METHOD_SECTIONS) == SIDE_BY_SIDE


def test_a_task_per_method_in_the_method_sections_and_longest_section_first():
    todo = eval_schedule.tasks(SIDE_BY_SIDE, IMAGE_LABELS, VIDEO_LABELS)
    assert [t.name for t in todo] == [
        "costly image methods: ScoreCAM", "costly image methods: LIME-1000",
        "video methods: SWAG-V_I", "video methods: Grad-CAM",
        "image methods: Grad-CAM", "image methods: SWAG_I",
        "superpixel ranking", "OOD detection", "filter removal", "surprise suppression"]
    assert all((t.method in COSTLY) == (t.section == "costly image methods") for t in todo if t.method)


@pytest.mark.parametrize(("clips", "flags", "left_out"), [
    (object(), {}, set()),
    (None, {}, {"video methods"}),
    (object(), {"no_store_tables": True}, {"OOD detection", "surprise suppression"}),
    (None, {"random_init": True}, {"video methods", "OOD detection", "surprise suppression"}),
])
def test_the_run_leaves_out_the_sections_it_does_not_make(clips, flags, left_out):
    args = argparse.Namespace(**{"random_init": False, "no_store_tables": False, **flags})
    assert evaluate.side_by_side_sections(args, clips) == SIDE_BY_SIDE - left_out


@pytest.mark.parametrize(("seconds", "workers", "wall"), [
    ([5, 4, 3, 3, 1], 2, 8),   # 5 | 4, 3 (free at 7) | 5, 3 (8) | 7 + 1: 8
    ([5, 4, 3, 3, 1], 1, 16),
    ([1, 1, 10], 2, 11),       # in the given order, not re-sorted: the long task starts last
])
def test_list_schedule_hands_each_task_to_the_first_free_worker(seconds, workers, wall):
    assert eval_schedule.list_schedule_seconds(seconds, workers) == wall


def _estimate(jobs: int) -> float:
    args = evaluate.parse_args(["--quick"])  # image_n 32, costly_n 16, video_n 16, grid_n 12, timing_n 5
    durations = {"grid search": 60.0, "costly image methods": 60.0, "image methods": 60.0, "video methods": 30.0,
                 "timing": 30.0, "total": 1000.0}
    tasks = [("costly image methods: LIME-1000", 40.0), ("costly image methods: ScoreCAM", 20.0),
             ("video methods: SWAG-V_I", 30.0), ("image methods: SWAG_I", 60.0)]
    return evaluate.full_estimate_minutes(durations, args, {"jobs": jobs, "tasks": tasks})


def test_side_by_side_estimate_hands_the_scaled_tasks_out_and_adds_the_serial_sections():
    # serial: grid 60 s + timing 30 s (same sizes) = 1.5 min. Scaled tasks: 40 x 100/16 = 250,
    # 20 x 100/16 = 125, 30 x 200/16 = 375, 60 x 500/32 = 937.5 s; two processes: 250 | 125,
    # 375 free at 500 | the image task after 250: 1187.5 s.
    assert _estimate(2) == pytest.approx(1.5 + 1187.5 / 60)


def test_sequential_estimate_adds_every_task():
    assert _estimate(1) == pytest.approx(1.5 + (250 + 125 + 375 + 937.5) / 60)


def test_report_names_each_process_s_methods_under_their_section():
    from bench import eval_report
    line = eval_report._schedule({"jobs": 2, "walls": [120.0, 30.0], "groups": [
        ["costly image methods: ScoreCAM", "video methods: Grad-CAM", "costly image methods: LIME-1000"],
        ["superpixel ranking"]]})
    assert ("costly image methods (ScoreCAM, LIME-1000) + video methods (Grad-CAM) (2.0 min); "
            "superpixel ranking (0.5 min)") in line
