"""Carrying a store's training arrays into a new store (recalibrate-distributions): byte for byte,
refused when they cannot be trusted, and calibrated again to the same verdicts."""

import json
from pathlib import Path

import numpy as np
import pytest

from explainserve.anomaly import StoreError, Scorer, build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.reissue import reissue_store
from explainserve.anomaly.store import ARRAY_SPECS, FORMAT_VERSION, store_sha256, write_manifest
from explainserve.anomaly.synthetic import SyntheticClasses

BUILD_TIME = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(num_classes=5, num_filters=24, seed=11)


@pytest.fixture(scope="module")
def held_out(synthetic):
    classes = np.tile(np.arange(5), 120)
    return synthetic.sample(classes, seed=5), classes


@pytest.fixture(scope="module")
def calibrated(synthetic, held_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "calibrated"
    build_store(synthetic.batches(50, batch_size=40), out, synthetic.meta, top_k=3, build_time=BUILD_TIME)
    store = load_store(out)
    save_calibration(store, calibrate(store, *held_out, min_class_count=20))
    return out


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_training_arrays_are_carried_byte_for_byte_and_calibrate_to_the_same_verdicts(calibrated, held_out, tmp_path):
    out = tmp_path / "new"
    out.mkdir()
    manifest = reissue_store(calibrated, out)
    for name in ARRAY_SPECS:
        assert (out / f"{name}.npy").read_bytes() == (calibrated / f"{name}.npy").read_bytes()
    assert manifest["calibration"] is None and manifest["format_version"] == FORMAT_VERSION
    assert not (out / "class_ranks.npy").exists()
    old = json.loads((calibrated / "manifest.json").read_text())
    assert "data" not in manifest and "data" not in old  # a store without a data record keeps none
    for key in ("model", "layer", "class_names", "counts", "percentile_levels", "top_k", "build_time"):
        assert manifest[key] == old[key]
    store = load_store(out)
    save_calibration(store, calibrate(store, *held_out, min_class_count=20))
    assert load_store(out).sha256 == load_store(calibrated).sha256  # same arrays, same calibration
    probe, classes = held_out[0][:50] * 1.7, held_out[1][:50]
    np.testing.assert_array_equal(Scorer(load_store(out)).score(probe, classes).p_value,
                                  Scorer(load_store(calibrated)).score(probe, classes).p_value)


def rewrite(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    manifest["sha256"] = store_sha256(manifest)
    write_manifest(folder, manifest)


def test_stores_that_cannot_be_carried_are_refused(calibrated, tmp_path):
    empty = tmp_path / "out"
    empty.mkdir()
    first = copy_folder(calibrated, tmp_path / "first-format")
    rewrite(first, format_version=1)
    with pytest.raises(StoreError, match=r"format_version 1 cannot be carried over \(formats \[2, 3\] can\)"):
        reissue_store(first, empty)
    shard = copy_folder(calibrated, tmp_path / "shard")
    rewrite(shard, shard={"index": 0, "count": 2, "classes": [0, 3]})
    with pytest.raises(StoreError, match="a shard; merge the shards first"):
        reissue_store(shard, empty)
    corrupt = copy_folder(calibrated, tmp_path / "corrupt")
    data = bytearray((corrupt / "mean.npy").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "mean.npy").write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"mean.npy sha256 does not match the manifest \(corrupt\)"):
        reissue_store(corrupt, empty)
    missing = copy_folder(calibrated, tmp_path / "missing")
    (missing / "grid.npy").unlink()
    with pytest.raises(StoreError, match="grid.npy is missing"):
        reissue_store(missing, empty)
    with pytest.raises(StoreError, match="nowhere: no such folder"):
        reissue_store(tmp_path / "nowhere", empty)
    (empty / "manifest.json").write_text("{not json")  # a folder whose manifest does not parse
    with pytest.raises(StoreError, match="unreadable manifest.json"):
        reissue_store(empty, tmp_path)


def test_the_data_record_keeps_its_training_part_and_takes_the_new_val_limit(synthetic, tmp_path):
    source = tmp_path / "source"
    data = {"source": "fashion-scenes", "seed": 0, "limit": {"train": 300, "rule": "first"},
            "val_limit": {"val": 4018, "rule": "first"}}
    build_store(synthetic.batches(20, batch_size=40), source, synthetic.meta, top_k=3, build_time=BUILD_TIME, data=data)
    for val_limit, expected in (({"val": 16072, "rule": "first"}, {"val": 16072, "rule": "first"}), (None, None)):
        out = tmp_path / f"out-{expected is None}"
        out.mkdir()
        manifest = reissue_store(source, out, val_limit=val_limit)
        assert {key: value for key, value in manifest["data"].items() if key != "val_limit"} == \
            {"source": "fashion-scenes", "seed": 0, "limit": {"train": 300, "rule": "first"}}
        assert manifest["data"].get("val_limit") == expected
