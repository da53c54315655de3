"""Atomic store publishing: fresh version folders, a symlink swapped in one rename, old data left
intact for readers; and the server's in-memory load, which no later write can change."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from explainserve.anomaly import StoreError, build_store, load_store
from explainserve.anomaly.publish import publishing, version_pattern
from explainserve.anomaly.synthetic import SyntheticClasses

BUILD_TIME = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticClasses.random(num_classes=5, num_filters=32, seed=4)


def publish(synthetic, out: Path, seed: int, keep: int = 1) -> str:
    """Publish a store built from training stream ``seed`` at ``out``; returns its sha256."""
    with publishing(out, keep=keep) as folder:
        build_store(synthetic.batches(20, seed=seed), folder, synthetic.meta, build_time=BUILD_TIME)
    return load_store(out).sha256


def versions(out: Path) -> list[str]:
    return sorted(entry.name for entry in out.parent.iterdir() if version_pattern(out.name).fullmatch(entry.name))


def test_publish_swaps_a_symlink_and_keeps_one_previous_version(synthetic, tmp_path):
    out = tmp_path / "stores" / "model"
    first = publish(synthetic, out, seed=1)
    assert out.is_symlink() and not os.path.isabs(os.readlink(out))
    assert versions(out) == [os.readlink(out)]
    first_folder = out.parent / os.readlink(out)
    second = publish(synthetic, out, seed=2)
    assert second != first and load_store(out).sha256 == second
    assert versions(out) == sorted([first_folder.name, os.readlink(out)])  # the previous one is kept
    third = publish(synthetic, out, seed=3)
    assert load_store(out).sha256 == third and len({first, second, third}) == 3
    assert not first_folder.exists() and len(versions(out)) == 2
    # nothing but the link and its versions: no partial folder or temporary link is left behind
    assert sorted(entry.name for entry in out.parent.iterdir()) == sorted(["model", *versions(out)])


def test_a_mapped_reader_keeps_its_data_through_later_publishes(synthetic, tmp_path):
    out = tmp_path / "model"
    publish(synthetic, out, seed=1, keep=0)
    first_folder = out.parent / os.readlink(out)
    reader = load_store(out)  # memory maps of version 1's files
    before = {name: np.array(array) for name, array in reader.arrays.items()}
    publish(synthetic, out, seed=2, keep=0)
    publish(synthetic, out, seed=3, keep=0)  # version 1's folder is gone by now
    assert not first_folder.exists()
    for name, array in reader.arrays.items():  # would fault with SIGBUS had a mapped file been truncated
        np.testing.assert_array_equal(array, before[name])


def test_a_failed_or_incomplete_build_leaves_the_published_store_alone(synthetic, tmp_path):
    out = tmp_path / "model"
    sha = publish(synthetic, out, seed=1)
    link = os.readlink(out)
    with pytest.raises(RuntimeError, match="build died"):
        with publishing(out) as folder:
            build_store(synthetic.batches(20, seed=5), folder, synthetic.meta, build_time=BUILD_TIME)
            raise RuntimeError("build died")
    with pytest.raises(StoreError, match="p_high.npy sha256 does not match"):
        with publishing(out) as folder:
            build_store(synthetic.batches(20, seed=5), folder, synthetic.meta, build_time=BUILD_TIME)
            data = bytearray((folder / "p_high.npy").read_bytes())
            data[-1] ^= 0xFF
            (folder / "p_high.npy").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="no manifest.json"):
        with publishing(out):
            pass
    assert os.readlink(out) == link and load_store(out).sha256 == sha
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(["model", link])


def test_a_plain_store_folder_is_exchanged_for_the_link(synthetic, tmp_path):
    out = tmp_path / "model"
    build_store(synthetic.batches(20, seed=1), out, synthetic.meta, build_time=BUILD_TIME)  # written in place, the old way
    old_sha = load_store(out).sha256
    new_sha = publish(synthetic, out, seed=2)
    assert out.is_symlink() and load_store(out).sha256 == new_sha
    (kept,) = [name for name in versions(out) if name != os.readlink(out)]
    assert load_store(tmp_path / kept).sha256 == old_sha


def test_bad_targets_are_refused(synthetic, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a store folder"):
        with publishing(tmp_path / "file"):
            pass
    with pytest.raises(ValueError, match="keep must be >= 0"):
        with publishing(tmp_path / "model", keep=-1):
            pass
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["file"]


def test_in_memory_load_equals_the_mapped_one_and_ignores_later_writes(synthetic, tmp_path):
    out = tmp_path / "model"
    publish(synthetic, out, seed=1)
    held = load_store(out, into_memory=True)
    assert held.path == tmp_path / os.readlink(out)  # the version folder, resolved once
    assert str(held.path) not in Path("/proc/self/maps").read_text()  # no file of it is mapped
    mapped = load_store(out)
    assert held.sha256 == mapped.sha256
    assert set(held.arrays) == {"mean", "p_low", "p_high", "exemplars", "beta_grid"}  # grid verified, not kept
    for name, array in held.arrays.items():
        assert not isinstance(array, np.memmap) and not array.flags.writeable
        np.testing.assert_array_equal(array, mapped.arrays[name])
    expected = {name: np.array(array) for name, array in held.arrays.items()}
    # rewrite the version folder in place (what a careless writer would do): the held arrays do not change
    for file in held.path.glob("*.npy"):
        file.write_bytes(b"\0" * 16)
    for name, array in held.arrays.items():
        np.testing.assert_array_equal(array, expected[name])
    with pytest.raises(StoreError, match="is 16 bytes"):
        load_store(out, into_memory=True)


def test_in_memory_load_refuses_the_same_faults(synthetic, tmp_path):
    out = tmp_path / "model"
    publish(synthetic, out, seed=1)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "exemplars.npy").unlink()
    with pytest.raises(StoreError, match="exemplars.npy is missing"):
        load_store(broken, into_memory=True)
    with pytest.raises(StoreError, match="no such folder"):
        load_store(tmp_path / "absent", into_memory=True)
