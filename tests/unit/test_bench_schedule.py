"""bench/evaluate.py's schedule: every section runs once, and the full-mode estimate is the wall
time of that schedule (the slowest process when side by side), not the sum of the sections."""

import argparse

import pytest

from bench import eval_schedule, evaluate

SIDE_BY_SIDE = set(evaluate.FULL_ESTIMATE) - {"grid search", "timing"}


def test_every_section_after_the_grid_search_but_the_timing_runs_in_exactly_one_group():
    names = [name for group in eval_schedule.GROUPS for name in group]
    assert sorted(names) == sorted(SIDE_BY_SIDE)
    assert set(eval_schedule.SECTIONS) == SIDE_BY_SIDE


@pytest.mark.parametrize(("clips", "flags", "left_out"), [
    (object(), {}, set()),
    (None, {}, {"video methods"}),
    (object(), {"no_store_tables": True}, {"OOD detection", "surprise suppression"}),
    (None, {"random_init": True}, {"video methods", "OOD detection", "surprise suppression"}),
])
def test_section_groups_leave_out_what_the_run_does_not_make(clips, flags, left_out):
    args = argparse.Namespace(**{"random_init": False, "no_store_tables": False, **flags})
    groups = evaluate.section_groups(args, clips)
    assert len(groups) == len(eval_schedule.GROUPS)
    assert {name for group in groups for name in group} == SIDE_BY_SIDE - left_out


def _estimate(jobs: int) -> float:
    args = evaluate.parse_args(["--quick"])  # image_n 32, costly_n 16, video_n 16, grid_n 12, timing_n 5
    durations = {"grid search": 60.0, "costly image methods": 60.0, "image methods": 60.0, "video methods": 30.0,
                 "timing": 30.0, "total": 1000.0}
    schedule = {"jobs": jobs, "groups": [["costly image methods"], ["image methods", "video methods"]],
                "walls": [66.0, 96.0]}  # 6 s of loading in each process
    return evaluate.full_estimate_minutes(durations, args, schedule)


def test_side_by_side_estimate_counts_the_slowest_process_and_the_serial_sections():
    # serial: grid 60 s (same size) + timing 30 s (same size) = 1.5 min; costly 60 s x 100/16 + 6 s = 381 s;
    # image 60 s x 500/32 + video 30 s x 200/16 + 6 s = 937.5 + 375 + 6 = 1318.5 s
    assert _estimate(2) == pytest.approx(1.5 + 1318.5 / 60)


def test_sequential_estimate_adds_every_group():
    assert _estimate(1) == pytest.approx(1.5 + (381 + 1318.5) / 60)
