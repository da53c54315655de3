"""build-distributions over a folder of real JPEG files: bad files skipped and recorded, a
class without images reported, two shards merged into exactly the unsharded store, and a
manifest of the same files built as two shards into the same arrays."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from explainserve import model_archive
from explainserve.anomaly import load_store
from explainserve.commands import distributions
from explainserve.data import FashionScenes
from support.data_folders import folder_name, write_image_folder

BUILD_TIME = "2026-01-01T00:00:00Z"
CLASSES = [folder_name(name) for name in FashionScenes("val", size=1).class_names]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=8).state_dict(), folder / model_archive.WEIGHTS_FILE)
    (folder / model_archive.METADATA_FILE).write_text(json.dumps({
        "name": "scenes-r18", "version": "1", "kind": "image", "input_size": [32, 32],
        "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": CLASSES, "layer": None,
        "architecture": {"factory": "torchvision.models.resnet18", "kwargs": {"num_classes": 8}}}))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = write_image_folder(tmp_path_factory.mktemp("images"), {"train": 3, "val": 1}, size=32,
                              skip_classes=("Sandal",))
    (root / "train" / "Coat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (root / "train" / "Coat" / "readme.txt").write_text("not an image")
    return root


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    distributions.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def common(model_folder, images) -> list[str]:
    return ["--model", str(model_folder), "--data", f"imagefolder:{images}", "--batch-size", "2",
            "--min-class-count", "2", "--target-fpr", "0.1", "--max-bad-fraction", "0.1", "--workers", "1"]


def test_folder_build_records_bad_files_shards_merge_byte_identical_and_a_manifest_gives_the_same(model_folder, images, tmp_path, capsys):
    full = tmp_path / "full"
    assert run("build-distributions", *common(model_folder, images), "--out", str(full), "--build-time", BUILD_TIME) == 0
    out = capsys.readouterr().out
    store = load_store(full, model_name="scenes-r18", model_version="1")
    assert store.counts.tolist() == [3, 3, 3, 3, 3, 0, 3, 3]  # Sandal (class 5) has no folder
    assert store.calibration["held_out_images"] == 7
    assert store.manifest["data"] == {"source": f"imagefolder:{images}"}
    record = json.loads((full / "build_record.json").read_text())
    assert record["train"]["files"] == 23 and record["train"]["bad"] == 2
    assert {Path(item["path"]).name for item in record["train"]["listed"]} == {"broken.jpg", "readme.txt"}
    assert record["classes_without_training_samples"] == ["Sandal"] and record["val"]["bad"] == 0
    assert "Sandal" in out and "broken.jpg" in out and "scored against the pooled distribution" in out
    assert store.manifest["pooled"]["classes"] == [5] and store.calibration["classes"]["source"][5] == "pooled"
    # Exemplar ids are positions in the sorted training list: class folders in class order.
    exemplars = store.arrays["exemplars"]
    assert set(exemplars[0].ravel()) == {0, 1, 2, -1} and set(exemplars[1].ravel()) == {3, 4, 5, -1}
    assert (exemplars[5] == -1).all()

    for shard in ("0", "1"):
        assert run("build-distributions", *common(model_folder, images), "--out", str(tmp_path / shard),
                   "--build-time", BUILD_TIME, "--shard", shard, "--num-shards", "2") == 0
    merged = tmp_path / "merged"
    assert run("merge-distributions", str(tmp_path / "1"), str(tmp_path / "0"), "--out", str(merged),
               *common(model_folder, images)) == 0
    assert merged.is_symlink()  # published atomically
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in full.iterdir())
    for file in sorted(full.iterdir()):
        assert (merged / file.name).read_bytes() == file.read_bytes(), file.name
    assert not (tmp_path / ".0.checkpoint").exists()  # the checkpoint goes once the store is published

    # The same files listed in a CSV manifest (paths relative to it), built as two shards and
    # merged: the same training list, so the same arrays, bad files and pooled rows included.
    rows = ["path,label,split"] + [f"{path.relative_to(images).as_posix()},{path.parent.name},{path.parts[-3]}"
                                   for path in sorted(images.glob("*/*/*"))]
    (images / "rows.csv").write_text("\n".join(rows) + "\n")
    listed = [*common(model_folder, images)]
    listed[listed.index(f"imagefolder:{images}")] = f"manifest:{images / 'rows.csv'}"
    for shard in ("0", "1"):
        assert run("build-distributions", *listed, "--out", str(tmp_path / f"m{shard}"), "--build-time", BUILD_TIME,
                   "--shard", shard, "--num-shards", "2") == 0
    assert run("merge-distributions", str(tmp_path / "m0"), str(tmp_path / "m1"), "--out", str(tmp_path / "listed"),
               *listed) == 0
    for file in sorted(full.glob("*.npy")):
        assert (tmp_path / "listed" / file.name).read_bytes() == file.read_bytes(), file.name
    assert json.loads((tmp_path / "listed" / "build_record.json").read_text())["train"]["bad"] == 2


def test_too_many_bad_files_fail_the_build_and_keep_finished_classes(model_folder, images, tmp_path):
    argv = [*common(model_folder, images), "--out", str(tmp_path / "store"), "--max-bad-fraction", "0.05"]
    with pytest.raises(ValueError, match=r"2 of 23 training files are bad.*\n.*broken.jpg"):
        run("build-distributions", *argv)
    finished = sorted(int(p.stem) for p in (tmp_path / ".store.checkpoint").glob("*.json") if p.stem.isdigit())
    assert finished == [0, 1, 2, 3, 4]  # classes up to Coat (4), where the bad files are


def test_class_names_must_match_the_model(model_folder, tmp_path):
    write_image_folder(tmp_path / "data", {"train": 1}, size=32)
    (tmp_path / "data" / "train" / "Sneaker").rename(tmp_path / "data" / "train" / "sneakers")
    with pytest.raises(ValueError, match=r"\['sneakers'\].*lacks: \['Sneaker'\]"):
        run("build-distributions", "--model", str(model_folder), "--data", f"imagefolder:{tmp_path / 'data'}",
            "--val-fraction", "0.5", "--out", str(tmp_path / "store"))


def test_limits_take_a_stratified_choice_of_the_files(model_folder, tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 3, "val": 2}, size=32)
    out = tmp_path / "store"
    assert run("build-distributions", "--model", str(model_folder), "--data", f"imagefolder:{root}", "--limit", "8",
               "--val-limit", "8", "--batch-size", "2", "--min-class-count", "2", "--target-fpr", "0.1",
               "--workers", "1", "--out", str(out)) == 0
    store = load_store(out)
    assert store.counts.tolist() == [1] * 8  # one of each class, not the first 8 files (3 classes)
    assert store.manifest["data"]["limit"]["train"] == 8 and store.manifest["data"]["val_limit"]["val"] == 8
    assert store.calibration["held_out_images"] == 8
    record = json.loads((out / "build_record.json").read_text())
    assert record["train"]["files"] == 8 and record["val"]["files"] == 8
