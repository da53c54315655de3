"""Mutation testing of the core library: each module against its own fast unit tests.

For every module in ``MODULES`` this copies the package and the tests into
``out/mutation/<name>/`` (kept between runs: mutmut reruns only the mutants of functions that
changed), writes a mutmut configuration that mutates that one file and selects its own test
files, runs ``mutmut run`` there and counts the outcome of every mutant.

    python scripts/mutation.py                    # every module
    python scripts/mutation.py swag superpixels   # some of them
    python scripts/mutation.py --list-survivors jitter_cam
    python scripts/mutation.py --report-only jitter_cam   # the last run's results, even unfinished
    python scripts/mutation.py --tests-added probe        # keep the killed, rerun the rest
    python scripts/mutation.py --sample 100 explainer     # 100 of the untested mutants, drawn at random
    python scripts/mutation.py --tests-added --sample 0 explainer   # the survivors only

Prints ``mutation_score[<name>]=X`` per module (with its counts and seconds taken),
``mutation_score=X`` over the modules run, ``mutation_seconds=N`` (wall) for the whole run and
``mutation_cpu_seconds=N``, the CPU time mutmut and its test processes used, which does not depend on
what else runs on the machine (a whole run on 2 idle cores takes about half of it). The
score is killed / (killed + survived), where a timeout counts as killed, a mutant that no
selected test executes counts as survived, and the mutants listed in
``tests/mutation/equivalent.txt`` (equivalent to the original: no test can tell them apart) are left out
of the score and of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.txt"
UNIT = "tests/unit/"

# Module -> (file to mutate, its own unit test files or single tests "file::test", tests of those files left out:
# "file::test[params]"). A test is
# left out only when a faster one in the selection checks the same code the same way (another
# architecture of the same family, a longer clip of the same video network), so that every
# module's run stays within minutes; make test still runs them all.
# The probe's tests left out of its mutation runs, each checked the same way by a faster test of
# the selection: ResNet-18 against captum stands for ResNet-50 (and for ResNet-18's shape check);
# RectifiedHeadNet for DenseNet's in-place F.relu and VGG11-BN's ReLUs after the target layer;
# VGG11's exact dy/dA for its shape check; R3D-18 for the other two video ResNets.
PROBE_LEFT_OUT = [
    "test_probe.py::test_guided_gradient_equals_captum[resnet50]",
    "test_probe.py::test_guided_gradient_applies_the_rule_after_the_target_layer_too[vgg11_bn]",
    "test_probe.py::test_guided_gradient_applies_the_rule_after_the_target_layer_too[densenet121]",
    "test_probe.py::test_in_place_op_after_the_target_layer_leaves_a_and_its_gradient_exact",
    "test_probe.py::test_probe_runs_on_image_architectures[resnet18-layer4]",
    "test_probe.py::test_probe_runs_on_image_architectures[vgg11-features.19]",
    "test_probe.py::test_probe_runs_on_image_architectures[densenet121-features]",
    "test_probe.py::test_probe_runs_on_video_architectures[mc3_18-layer4]",
    "test_probe.py::test_probe_runs_on_video_architectures[r2plus1d_18-layer4]",
]
MODULES = {
    "probe": ("explainserve/probe.py", ["test_probe.py"], PROBE_LEFT_OUT),
    "guided": ("explainserve/guided.py", ["test_probe.py"], PROBE_LEFT_OUT),
    "layers": ("explainserve/layers.py", ["test_layers.py"], []),
    "cam": ("explainserve/cam.py", ["test_cam.py"], []),
    "swag": ("explainserve/swag.py", ["test_swag.py", "test_superpixels.py"], []),
    "superpixels": ("explainserve/superpixels.py", ["test_superpixels.py",
                    "test_slic_iterations.py::test_only_images_cut_into_many_superpixels_get_fewer_iterations"], []),
    "jitter_cam": ("explainserve/jitter_cam.py", ["test_jitter_cam.py"], []),
    "grad_amap": ("explainserve/grad_amap.py", ["test_cam.py"], []),
    # Explainer.filter_regions and suppress_surprise are checked against the library in the region tests.
    "explainer": ("explainserve/explainer.py", ["test_explainer.py",
                                                "test_surprise_region.py::test_explainer_regions_from_raw_samples",
                                                "test_surprise_region.py::test_explainer_suppression_equals_deleting_by_hand"], []),
    "scorer": ("explainserve/anomaly/scorer.py", ["test_anomaly_scoring.py", "test_anomaly_feature_scoring.py"], []),
    # The pooled group (classes without training images) is checked by hand in the scoring tests.
    "calibration": ("explainserve/anomaly/calibration.py",
                    ["test_anomaly_calibration.py", "test_anomaly_scoring.py", "test_anomaly_feature_scoring.py"], []),
    # The trained networks' features (slow) add nothing the synthetic references do not check.
    "feature_tests": ("explainserve/anomaly/feature_tests.py",
                      ["test_anomaly_feature_tests.py", "test_anomaly_feature_scoring.py"],
                      [f"test_anomaly_feature_tests.py::test_both_tests_match_their_references_on_a_trained_networks_"
                       f"pooled_features[{kind}]" for kind in ("image", "video")]),
}

KILLED = {"killed", "timeout", "segfault"}
SURVIVED = {"survived", "no tests"}


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """Mutant name -> the one-line reason it was judged equivalent (``name  reason`` per line)."""
    equivalent = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                equivalent[name] = reason.strip()
    return equivalent


def tests_fingerprint(tests: list[str], selection: list[str]) -> str:
    """sha256 of the test files a module is checked with, the selection, their conftest, the harnesses
    and the mutation runs' pytest plugin."""
    digest = hashlib.sha256(json.dumps(selection).encode())
    for path in [ROOT / UNIT / test.partition("::")[0] for test in tests] + [
            ROOT / "tests" / "conftest.py", ROOT / "tests" / "mutation" / "fastest_first.py",
            *sorted((ROOT / "tests" / "support").glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare(name: str, workdir: Path, keep_results: bool = False) -> Path:
    """Copy the package and tests into ``workdir/name`` and write its mutmut configuration.

    mutmut keeps each mutant's result until its function changes; when the tests change, the
    results are dropped so that every mutant meets the new tests, unless ``keep_results``
    (tests were only added: a killed mutant stays killed, only the others need a run; the
    tests are traced again, so that a mutant meets every test now reaching its function).
    """
    source, tests, left_out = MODULES[name]
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    selection = [UNIT + test for test in tests]
    for test in left_out:
        selection += ["--deselect", UNIT + test]
    fingerprint, recorded = tests_fingerprint(tests, selection), root / "tests.sha256"
    if not recorded.exists() or recorded.read_text() != fingerprint:
        if keep_results:
            # mutmut traces again only the tests it has not seen: an extended test would keep
            # the functions it reached before, and a mutant would not meet it.
            (root / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        else:
            shutil.rmtree(root / "mutants", ignore_errors=True)
        recorded.write_text(fingerprint)
    for folder in ("explainserve", "tests", "bench"):  # some unit tests check the bench's code against the library
        shutil.copytree(ROOT / folder, root / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # mutmut regenerates a file's mutants only when the file is newer than them, and copytree
    # keeps the worktree's times: mark the mutated file new, so an edit is never missed (the
    # results of functions whose code is unchanged are kept all the same).
    os.utime(root / source)
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + f"""
[tool.mutmut]
source_paths = ["explainserve"]
only_mutate = ["{source}"]
also_copy = ["bench/"]
pytest_add_cli_args_test_selection = {json.dumps(selection)}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "tests.mutation.fastest_first"]
# A mutant times out after 15 x (its tests' recorded seconds + timeout_constant) of wall time. With
# mutmut's 1 s, a mutant of a function only a 0.1 s test reaches was cut off at 16.5 s while the
# test's module fixture (a ResNet and its dry pass) was still being built on the loaded machine,
# and counted as killed; 10 s leaves room for fixtures, and a mutant that really hangs still ends.
timeout_constant = 10.0
# torch and grpc are not fork-safe once used: fork every mutant from a clean server.
process_isolation = "forkserver"
""")
    return root


def statuses(root: Path, source: str) -> dict[str, str]:
    """Mutant name -> mutmut's status, read from the run's meta file."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((root / "mutants" / f"{source}.meta").read_text())
    return {key: status_by_exit_code[code] for key, code in meta["exit_code_by_key"].items()}


# mutmut's own first step of ``mutmut run`` (mutmut 3.8.1): write the mutants and their meta
# files, keeping the results of functions that did not change. Run alone, it names the mutants
# before any test runs, so that those judged equivalent are left out of the run.
GENERATE = """
import os
from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, set_mutant_under_test,
                             setup_source_paths, store_lines_covered_by_tests)
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests(); create_mutants(1)
"""


def run_mutmut(name: str, args: argparse.Namespace, equivalent: dict[str, str]) -> int:
    """Run mutmut for one module: every mutant not yet tested, or with ``args.tests_added`` the
    last run's survivors and the mutants it had not reached; with ``args.sample`` only that many
    of the untested mutants, drawn at random. The mutants judged equivalent are never run (the
    score leaves them out, and each would run every test that reaches it, as a survivor does).
    Returns mutmut's exit code."""
    source, root = MODULES[name][0], prepare(name, args.workdir, keep_results=args.tests_added)
    generated = subprocess.run([sys.executable, "-c", GENERATE], cwd=root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if generated.returncode != 0:
        print(f"mutmut could not write the mutants of {name}:\n{generated.stderr[-2000:]}", file=sys.stderr)
        return generated.returncode
    current = {key: status for key, status in statuses(root, source).items() if key not in equivalent}
    untested = sorted(key for key, status in current.items() if status == "not checked")
    if args.sample is not None:
        untested = random.Random(name).sample(untested, min(args.sample, len(untested)))
    # After tests were added: the survivors (and mutants a run left unfinished) too.
    rerun = [key for key, status in current.items()
             if args.tests_added and status not in KILLED and status != "not checked"] + untested
    if not rerun:
        return 0
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *rerun]
    run = subprocess.run(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        print(f"mutmut run failed for {name} (rc {run.returncode}):\n{run.stderr[-2000:]}", file=sys.stderr)
    return run.returncode


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (mutmut and, through it, every test process)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def score(counts: Counter) -> float:
    killed = sum(counts[s] for s in KILLED)
    survived = sum(counts[s] for s in SURVIVED)
    return killed / (killed + survived) if killed + survived else float("nan")


def wilson_interval(counts: Counter, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of the score when the tested mutants are a random sample of the module's."""
    killed, n = sum(counts[s] for s in KILLED), sum(counts[s] for s in KILLED | SURVIVED)
    if not n:
        return float("nan"), float("nan")
    p, spread = killed / n, z * math.sqrt(killed * (n - killed) / n + z * z / 4) / n
    centre, scale = p + z * z / (2 * n), 1 + z * z / n
    return (centre / scale - spread / scale, centre / scale + spread / scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to mutate (default all): {', '.join(MODULES)}")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "mutation")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--list-survivors", action="store_true", help="print each surviving mutant's name")
    parser.add_argument("--tests-added", action="store_true",
                        help="tests were only added since the last run: keep its killed mutants, rerun its survivors "
                             "and test the mutants it had not reached")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="test N of the mutants not tested yet, drawn at random (seeded by the module's name; a rerun "
                             "draws among those still untested): a partial run whose score estimates the module's, "
                             "with its 95 %% interval, when a whole run does not fit")
    parser.add_argument("--report-only", action="store_true",
                        help="count the last run's results without running; mutants not tested yet show as not_checked")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"modules: unknown {unknown}; expected some of {list(MODULES)}")
    equivalent = read_equivalent()
    total = Counter()
    run_started, run_cpu = time.monotonic(), children_cpu_seconds()
    for name in args.modules or list(MODULES):
        source = MODULES[name][0]
        root = args.workdir / name
        started, cpu = time.monotonic(), children_cpu_seconds()
        if not args.report_only:
            if args.tests_added and not (root / "mutants" / f"{source}.meta").exists():
                parser.error(f"--tests-added: {name} has no earlier run to keep")
            code = run_mutmut(name, args, equivalent)
            if code:
                return code
        if not (root / "mutants" / f"{source}.meta").exists():
            print(f"mutation_score[{name}]=nan not_run")
            continue
        counts = Counter()
        for key, status in statuses(root, source).items():
            if key in equivalent:
                counts["equivalent"] += 1
                continue
            counts[status] += 1
            if args.list_survivors and status in SURVIVED:
                print(f"  {status}: {key}")
        total += counts
        detail = " ".join(f"{status.replace(' ', '_')}={n}" for status, n in sorted(counts.items()))
        elapsed = "" if args.report_only else (f" seconds={time.monotonic() - started:.0f}"
                                               f" cpu_seconds={children_cpu_seconds() - cpu:.0f}")
        interval = ""
        if counts["not checked"]:
            low, high = wilson_interval(counts)
            interval = f" partial_95pct=[{low:.3f},{high:.3f}]"
        print(f"mutation_score[{name}]={score(counts):.3f} {detail}{interval}{elapsed}", flush=True)
    print(f"mutation_score={score(total):.3f}")
    if not args.report_only:
        print(f"mutation_seconds={time.monotonic() - run_started:.0f}")
        print(f"mutation_cpu_seconds={children_cpu_seconds() - run_cpu:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
