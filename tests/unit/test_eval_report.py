"""The report header names the clips only when Table 3 ran."""

from bench import eval_report


def _results(with_video: bool) -> dict:
    args = {"mode": "quick", "image_n": 12, "costly_n": 2, "grid_n": 2, "filter_n": 24, "timing_n": 2,
            "ranking_n": 2, "video_n": 16, "random_init": False}
    results = {"args": args, "durations": {"image methods": 60.0, "total": 120.0},
               "load_average": ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)), "command": "python bench/evaluate.py --quick",
               "image_model": "fashion_vgg512", "image_accuracy": 0.9, "image_segments": 24, "full_estimate_min": 50.0,
               "preregistration": "table1_images=12\n",
               "schedule": {"jobs": 2, "groups": [["costly image methods"], ["image methods"]], "walls": [90.0, 60.0]}}
    if with_video:
        results.update(video={}, video_model="motion_c3d", video_accuracy=1.0, video_segments=39)
    else:
        results["video_missing"] = "--model image_large runs images only"
    return results


def _subsets_line(results: dict) -> str:
    return next(line for line in eval_report._header(results) if line.startswith("- Fixed subsets"))


def test_header_lists_the_clips_of_a_run_with_table_3():
    assert _subsets_line(_results(True)).endswith("2 test images (Table 6), 16 MovingFashion test clips (Table 3).")


def test_header_of_an_image_only_run_says_table_3_did_not_run():
    line = _subsets_line(_results(False))
    assert "MovingFashion" not in line
    assert line.endswith("2 test images (Table 6); no clips (Table 3 not run).")
