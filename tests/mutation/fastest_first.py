"""pytest plugin of the mutation runs (scripts/mutation.py): run a mutant's tests fastest first.

mutmut stops a mutant's run at its first failing test and records how long each test took in
``mutmut-stats.json`` (in the folder the tests run from). Ordering by those durations lets a
mutant that a quick test kills cost that test only; a surviving mutant still runs them all.
"""

import json
from pathlib import Path

STATS = Path("mutmut-stats.json")


def pytest_collection_modifyitems(items):
    if STATS.exists():
        durations = json.loads(STATS.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
