"""The distribution store: exact per-class summaries, round trip, shard/merge equality, refusal of bad stores."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from explainserve.anomaly import (StoreError, build_store, calibrate, load_store, merge_stores,
                                  save_calibration, shard_classes)
from explainserve.anomaly.reference import ClassReference
from explainserve.anomaly.summary import PERCENTILE_LEVELS, summarise_class
from explainserve.anomaly.synthetic import SyntheticClasses

BUILD_TIME = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(num_classes=7, num_filters=48, seed=3)


@pytest.fixture(scope="module")
def store_dir(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "full"
    build_store(synthetic.batches(60, batch_size=50), out, synthetic.meta, top_k=4, build_time=BUILD_TIME)
    return out


def training_rows(synthetic, images_per_class, batch_size):
    alpha, classes, ids = zip(*synthetic.batches(images_per_class, batch_size=batch_size))
    return np.concatenate(alpha), np.concatenate(classes), np.concatenate(ids)


def test_misfits_name_each_difference_from_the_model_to_score(synthetic):
    meta = dataclasses.replace(synthetic.meta, input_transform={"input_size": [64, 64], "mean": [0.5], "std": [0.25]})
    same = {"layer": "layer4", "num_filters": 48, "input_size": [64, 64], "mean": [0.5], "std": [0.25]}
    assert meta.misfits(same) == [] and meta.misfits({}) == []
    assert meta.misfits({**same, "mean": [0.5 * (1 + 1e-7)]}) == []  # JSON rounding is no difference
    assert meta.misfits({**same, "layer": "layer3", "num_filters": 47}) == ["layer 'layer4', not 'layer3'",
                                                                            "num_filters 48, not 47"]
    assert meta.misfits({**same, "input_size": [64, 65], "std": [0.25] * 3}) == [
        "input_size [64, 64], not [64, 65]", "std [0.25], not [0.25, 0.25, 0.25]"]
    assert meta.misfits({**same, "mean": [0.5001]}) == ["mean [0.5], not [0.5001]"]
    # What the store does not record is not compared: the synthetic meta records "size", not input_size.
    assert synthetic.meta.misfits({"input_size": [1, 1]}) == []


def test_summary_is_exact_on_a_hand_made_class():
    values = np.array([[1, 5], [3, 5], [2, 9], [4, 0]], dtype=np.float32)
    ids = np.array([10, 11, 12, 13])
    summary = summarise_class(values, ids, top_k=6)
    np.testing.assert_array_equal(summary.mean, [2.5, 4.75])
    # Linear interpolation between order statistics: P99.9 of 4 values sits at rank 2.997.
    np.testing.assert_array_equal(summary.p_high, np.float32([3 + 0.997 * 1, 5 + 0.997 * 4]))
    np.testing.assert_array_equal(summary.p_low, np.float32([1 + 0.003 * 1, 0 + 0.003 * 5]))
    assert summary.grid.dtype == np.float16 and summary.grid.shape == (len(PERCENTILE_LEVELS), 2)
    np.testing.assert_array_equal(summary.grid[0], [1, 0])
    np.testing.assert_array_equal(summary.grid[-1], [4, 9])
    # Best first; the tie between ids 10 and 11 (alpha 5) goes to the smaller id; padded with -1.
    np.testing.assert_array_equal(summary.exemplars, [[13, 11, 12, 10, -1, -1], [12, 10, 11, 13, -1, -1]])
    betas = values.mean(axis=1, dtype=np.float64) - summary.mean.astype(np.float64).mean()
    np.testing.assert_allclose(summary.beta_grid, np.percentile(betas, np.arange(101)), rtol=1e-6)


def test_summary_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 20, size=(200, 16)).astype(np.float32)  # many ties
    ids = rng.permutation(1000)[:200]
    exemplars = summarise_class(values, ids, top_k=5).exemplars
    for n in range(16):
        expected = sorted(range(200), key=lambda i: (-values[i, n], ids[i]))[:5]
        np.testing.assert_array_equal(exemplars[n], ids[expected])


def test_a_model_name_without_a_version_matches_any_version(store_dir):
    assert load_store(store_dir, model_name="synthetic").meta.model_version == "1"
    with pytest.raises(StoreError, match="built for model 'synthetic' version '1', not 'other'"):
        load_store(store_dir, model_name="other")
    with pytest.raises(StoreError, match="not 'synthetic' version '2'"):
        load_store(store_dir, model_name="synthetic", model_version="2")


def test_alpha_is_checked_row_by_row(store_dir):
    # Rows of finite, large scores are accepted whatever the batch's total; a bad row is named.
    reference = ClassReference(load_store(store_dir))
    big = np.full((3, reference.num_filters), 3e38 / reference.num_filters / 2, np.float32)
    with np.errstate(over="ignore"):  # the overflow is the point
        assert np.isinf(big.sum(dtype=np.float32)) and np.isfinite(big.sum(axis=1, dtype=np.float32)).all()
    alpha, classes, _ = reference.check(big, np.array([0, 1, 2]))
    assert alpha.shape == big.shape and classes.tolist() == [0, 1, 2]
    bad = big.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"alpha\[2\] contains NaN or infinite values"):
        reference.check(bad, np.array([0, 1, 2]))
    bad[2, 5], bad[1] = 0.0, 3e38
    with pytest.raises(ValueError, match=r"alpha\[1\] values are too large: their sum overflows float32"):
        reference.check(bad, np.array([0, 1, 2]))


def test_store_round_trip(store_dir, synthetic):
    store = load_store(store_dir, model_name="synthetic", model_version="1")
    alpha, classes, ids = training_rows(synthetic, 60, 50)
    assert store.counts.tolist() == [60] * 7
    assert store.manifest["build_time"] == BUILD_TIME
    assert store.build_timestamp == 1767225600.0  # 2026-01-01T00:00:00Z
    assert store.meta.class_names == synthetic.meta.class_names
    assert store.manifest["input_transform"] == synthetic.meta.input_transform
    for class_id in (0, 6):
        rows = classes == class_id
        expected = summarise_class(alpha[rows], ids[rows], top_k=4)
        for name in ("mean", "p_low", "p_high", "grid", "exemplars", "beta_grid"):
            np.testing.assert_array_equal(store.arrays[name][class_id], getattr(expected, name), err_msg=name)
    assert isinstance(store.arrays["p_high"], np.memmap)


def read_files(directory: Path) -> dict:
    return {file.name: file.read_bytes() for file in sorted(directory.iterdir())}


def test_merged_shards_are_byte_identical_to_an_unsharded_build(store_dir, synthetic, tmp_path):
    shards = []
    for index in (2, 0, 1):  # shards may finish in any order
        shards.append(build_store(synthetic.batches(60, batch_size=50), tmp_path / f"shard{index}", synthetic.meta,
                                  shard_index=index, num_shards=3, top_k=4, build_time=BUILD_TIME))
    assert load_store(tmp_path / "shard1").manifest["shard"] == {"index": 1, "count": 3, "classes": [2, 4]}
    merged = merge_stores(shards, tmp_path / "merged")
    unsharded = read_files(store_dir)
    assert read_files(merged).keys() == unsharded.keys()
    for name, data in read_files(merged).items():
        assert data == unsharded[name], name

    val_classes = np.repeat(np.arange(7), 40)
    val_alpha = synthetic.sample(val_classes, seed=11)
    for directory in (merged, tmp_path / "copy"):
        if directory.name == "copy":
            directory.mkdir()
            for name, data in unsharded.items():
                (directory / name).write_bytes(data)
        store = load_store(directory)
        save_calibration(store, calibrate(store, val_alpha, val_classes))
    assert read_files(merged) == read_files(tmp_path / "copy")


def test_merge_refuses_incomplete_or_mixed_shards(synthetic, tmp_path):
    make = lambda index, count: build_store(synthetic.batches(5), tmp_path / f"s{index}of{count}", synthetic.meta,
                                            shard_index=index, num_shards=count, build_time=BUILD_TIME)
    first, second = make(0, 2), make(1, 2)
    with pytest.raises(StoreError, match=r"need shards 0..1 exactly once, got indices \[0\]"):
        merge_stores([first], tmp_path / "out")
    with pytest.raises(StoreError, match="exactly once"):
        merge_stores([first, first, second], tmp_path / "out")
    with pytest.raises(StoreError, match="different shard counts"):
        merge_stores([first, make(1, 3)], tmp_path / "out")
    whole = build_store(synthetic.batches(5), tmp_path / "whole", synthetic.meta, build_time=BUILD_TIME)
    with pytest.raises(StoreError, match="not a shard"):
        merge_stores([whole], tmp_path / "out")


def test_shard_classes_partition_the_classes():
    slices = [shard_classes(10, index, 4) for index in range(4)]
    assert [list(s) for s in slices] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 3\], got 4"):
        shard_classes(10, 4, 4)
    with pytest.raises(ValueError, match=r"num_shards must be in \[1, 10\]"):
        shard_classes(10, 0, 11)


def copy_store(source: Path, target: Path) -> Path:
    target.mkdir()
    for name, data in read_files(source).items():
        (target / name).write_bytes(data)
    return target


def test_corrupt_store_is_refused(store_dir, tmp_path):
    corrupt = copy_store(store_dir, tmp_path / "corrupt")
    data = bytearray((corrupt / "p_high.npy").read_bytes())
    data[-3] ^= 0xFF
    (corrupt / "p_high.npy").write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"p_high.npy sha256 does not match the manifest \(corrupt\)"):
        load_store(corrupt)


def test_truncated_store_is_refused(store_dir, tmp_path):
    truncated = copy_store(store_dir, tmp_path / "truncated")
    data = (truncated / "exemplars.npy").read_bytes()
    (truncated / "exemplars.npy").write_bytes(data[:-100])
    with pytest.raises(StoreError, match=rf"exemplars.npy is {len(data) - 100} bytes, the manifest says {len(data)}"):
        load_store(truncated)


def test_missing_parts_and_wrong_model_are_refused(store_dir, tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        load_store(tmp_path)
    broken = copy_store(store_dir, tmp_path / "broken")
    (broken / "mean.npy").unlink()
    with pytest.raises(StoreError, match="mean.npy is missing"):
        load_store(broken)
    (broken / "manifest.json").write_text('{"format_version": 3, "model": {"name": "x", "version": "1"}}')
    with pytest.raises(StoreError, match=r"manifest.json lacks \['layer'"):
        load_store(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest.json"):
        load_store(broken)
    with pytest.raises(StoreError, match="built for model 'synthetic' version '1', not 'synthetic' version '2'"):
        load_store(store_dir, model_name="synthetic", model_version="2")


@pytest.mark.parametrize("version, lacks", [(1, "conformal p-values"), (2, "the pooled-feature tests")])
def test_a_store_of_an_older_format_is_refused_with_how_to_rebuild_it(store_dir, tmp_path, version, lacks):
    old = copy_store(store_dir, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format_version=version)))
    with pytest.raises(StoreError, match=rf"format_version {version} is not 3 \(built by an older explainserve, before "
                                         rf"{lacks}\); rebuild it with `explainserve build-distributions") as refused:
        load_store(old)
    # A format-2 store's training arrays are today's: it can be recalibrated instead; a format-1 store's cannot.
    assert ("recalibrate-distributions DIR --out DIR" in str(refused.value)) == (version == 2)
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format_version=4)))
    with pytest.raises(StoreError, match=r"format_version 4 is not 3$"):
        load_store(old)


def test_class_without_training_images_holds_the_pool_and_is_empty_in_a_shard(synthetic, tmp_path):
    def batches():
        return ((a[c != 4], c[c != 4], i[c != 4]) for a, c, i in synthetic.batches(10))

    store = load_store(build_store(batches(), tmp_path / "gap", synthetic.meta, build_time=BUILD_TIME))
    assert store.counts[4] == 0 and store.counts[3] == 10 and store.manifest["pooled"]["classes"] == [4]
    others = np.flatnonzero(store.counts > 0)
    expected_mean = (store.counts[others, None] * store.arrays["mean"][others].astype(np.float64)).sum(0) / store.counts.sum()
    np.testing.assert_allclose(store.arrays["mean"][4], expected_mean, rtol=1e-6)
    # The pooled tails lie within the classes' extremes, and the shard holding class 4 keeps it NaN.
    assert (store.arrays["p_high"][4] <= store.arrays["grid"][others, -1].max(axis=0)).all()
    assert (store.arrays["exemplars"][4] == -1).all()
    shard = load_store(build_store(batches(), tmp_path / "shard", synthetic.meta, build_time=BUILD_TIME,
                                   shard_index=1, num_shards=2))
    assert np.isnan(shard.arrays["p_high"][4 - shard.class_offset]).all() and "pooled" not in shard.manifest


def test_build_rejects_bad_rows(synthetic, tmp_path):
    alpha, classes, ids = next(synthetic.batches(2))
    cases = [
        ((alpha[:, :-1], classes, ids), r"alpha must have shape \(B, 48\)"),
        ((np.where(np.arange(48) == 3, np.nan, alpha), classes, ids), "NaN"),
        ((alpha, classes + 1, ids), r"class ids must be in \[0, 6\]"),
        ((alpha, classes, ids - 1), "image ids must be in"),
        ((alpha, classes + 0.5, ids), "classes and image_ids must be integers"),
    ]
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            build_store([batch], tmp_path / "bad", synthetic.meta)
    with pytest.raises(ValueError, match="build_time must be ISO 8601 UTC"):
        build_store([(alpha, classes, ids)], tmp_path / "bad", synthetic.meta, build_time="yesterday")
    with pytest.raises(ValueError, match="does not fit the float16 grid"):
        build_store([(alpha * 1e7, classes, ids)], tmp_path / "bad", synthetic.meta)
