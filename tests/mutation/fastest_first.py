"""pytest plugin of the mutation runs (scripts/mutation.py): one torch thread, fastest tests first.

mutmut tests two mutants at a time (``--max-children``), each in its own process, so the run
already keeps both cores busy; torch's two intra-op threads per process (tests/conftest.py) would
put four threads on two cores, where OpenMP's waiting threads spin: the explainer's selection took
37 s of CPU with two threads and 10 s with one, at load 3.7, for the same 27 tests.

mutmut stops a mutant's run at its first failing test and records how long each test took in
``mutmut-stats.json`` (in the folder the tests run from). Ordering by those durations lets a
mutant that a quick test kills cost that test only; a surviving mutant still runs them all.
"""

import json
from pathlib import Path

import torch

STATS = Path("mutmut-stats.json")


def pytest_sessionstart(session):
    # After tests/conftest.py has set two threads: in mutmut's stats and clean passes and in
    # every mutant's process alike, so the recorded durations are those the mutants meet.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    if STATS.exists():
        durations = json.loads(STATS.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
