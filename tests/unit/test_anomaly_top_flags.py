"""top_flags: each row's k most extreme flags equal the first k of BatchScores.sample's lists."""

from __future__ import annotations

import numpy as np
import pytest

from explainserve.anomaly import Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.anomaly.reference import Flags
from explainserve.anomaly.top_flags import top_flags

CLASSES, FILTERS = 6, 40


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Scorer:
    synthetic = SyntheticClasses.random(CLASSES, FILTERS, seed=4)
    directory = tmp_path_factory.mktemp("top_flags") / "store"
    build_store(synthetic.batches(30, batch_size=60), directory, synthetic.meta, build_time="2026-01-01T00:00:00Z")
    store = load_store(directory)
    held_out = np.repeat(np.arange(CLASSES), 20)
    save_calibration(store, calibrate(store, synthetic.sample(held_out, seed=8), held_out))
    return Scorer(load_store(directory))


@pytest.mark.parametrize("k", [0, 1, 4, FILTERS])
def test_top_flags_are_the_first_k_of_each_sample(scorer, k):
    rng = np.random.default_rng(k)
    classes = rng.integers(0, CLASSES, size=30)
    mean = np.asarray(scorer.store.arrays["mean"])[classes]
    alpha = (mean * rng.normal(1.0, rng.choice([0.1, 1.0, 3.0], size=(30, 1)), mean.shape)).astype(np.float32)
    alpha[0] = alpha[1]  # a duplicate row
    alpha[2] = scorer.reference.p_high[classes[2]] + 1.0  # every filter surprising
    scores = scorer.score(alpha, classes)
    top = top_flags(scores, k)
    assert top.surprising_filters.shape == top.missing_exceedance.shape == (30, k)
    for row in range(30):
        sample = scores.sample(row)
        for filters, exceedance, flags in ((top.surprising_filters, top.surprising_exceedance, sample.surprising),
                                           (top.missing_filters, top.missing_exceedance, sample.expected_missing)):
            expected = [(f.filter, np.float32(f.exceedance)) for f in flags[:k]]
            expected += [(-1, np.float32(0))] * (k - len(expected))
            assert list(zip(filters[row].tolist(), exceedance[row])) == expected, row
    counts = scores.surprise_count
    assert (counts > 4).any() and (counts == 0).any()  # full rows and padded rows both occur


def test_top_flags_refuses_a_negative_k(scorer):
    scores = scorer.score(np.asarray(scorer.store.arrays["mean"])[:2], np.arange(2))
    with pytest.raises(ValueError, match="k must be >= 0"):
        top_flags(scores, -1)


def test_top_one_equals_the_first_column_of_the_sorted_top():
    # top(1) takes each row's first largest without sorting; top(k > 1) sorts every entry.
    # Ties, zeros of either sign, infinities, NaN (above +inf) and empty rows, by hand:
    rows = [[(3, 2.0), (5, 7.5), (9, 7.5)],  # a tie: the lower filter first
            [],
            [(0, 0.0), (1, -0.0), (2, 0.0)],  # -0.0 ties with 0.0
            [(4, 1.0), (6, np.inf), (7, 3.0)],
            [(1, np.nan), (2, np.inf)],
            [(8, 0.25)]]
    num_filters = 10
    entries = [row * num_filters + f for row, flags in enumerate(rows) for f, _ in flags]
    starts = np.cumsum([0] + [len(flags) for flags in rows])
    exceedance = np.array([e for flags in rows for _, e in flags], dtype=np.float32)
    flags = Flags(np.array(entries, dtype=np.int64), starts, exceedance, num_filters)
    filters, values = flags.top(1)
    sorted_filters, sorted_values = flags.top(3)
    assert filters[:, 0].tolist() == sorted_filters[:, 0].tolist() == [5, -1, 0, 6, 1, 8]
    np.testing.assert_array_equal(values[:, 0], sorted_values[:, 0])

    rng = np.random.default_rng(3)  # and on many random rows with repeated values
    mask = rng.random((200, 64)) < rng.random((200, 1))
    entries = np.flatnonzero(mask)
    starts = np.searchsorted(entries, np.arange(201) * 64)
    flags = Flags(entries, starts, rng.choice([0.0, 0.5, 1.0, 2.0], size=len(entries)).astype(np.float32), 64)
    assert [a.tolist() for a in flags.top(1)] == [a[:, :1].tolist() for a in flags.top(2)]
