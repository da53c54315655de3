"""build-distributions and merge-distributions end to end: a real model on FashionScenes."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from explainserve import model_archive
from explainserve.anomaly import Scorer, load_store
from explainserve.commands import distributions
from explainserve.data import FashionScenes

BUILD_TIME = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def archive_folder(tmp_path_factory):
    """An unpacked model archive: a random-init MobileNetV3-small for the 8 FashionScenes classes at 64 px."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=8)
    torch.save(model.state_dict(), folder / model_archive.WEIGHTS_FILE)
    metadata = {
        "name": "scenes-mobilenet", "version": "3", "kind": "image", "input_size": [64, 64],
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "class_names": FashionScenes("val", size=1).class_names, "layer": None,
        "architecture": {"factory": "torchvision.models.mobilenet_v3_small", "kwargs": {"num_classes": 8}},
    }
    (folder / model_archive.METADATA_FILE).write_text(json.dumps(metadata))
    return folder


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    distributions.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def common(archive_folder: Path) -> list[str]:
    return ["--model", str(archive_folder), "--data", "fashion-scenes", "--batch-size", "16",
            "--val-limit", "16", "--min-class-count", "2", "--target-fpr", "0.1"]


@pytest.mark.slow
def test_build_then_merge_match_and_score(archive_folder, tmp_path, capsys):
    full = tmp_path / "full"
    assert run("build-distributions", *common(archive_folder), "--out", str(full), "--limit", "24",
               "--top-k", "3", "--build-time", BUILD_TIME) == 0
    store = load_store(full, model_name="scenes-mobilenet", model_version="3")
    labels = FashionScenes("train", size=24, image_size=64).batch().labels
    assert store.counts.tolist() == np.bincount(labels, minlength=8).tolist()
    assert store.meta.layer == "features" and store.meta.num_filters == 576
    assert store.manifest["input_transform"]["input_size"] == [64, 64]
    assert store.manifest["data"] == {"source": "fashion-scenes", "seed": 0, "limit": {"train": 24, "rule": distributions.DEMO_LIMIT_RULE},
                                      "val_limit": {"val": 16, "rule": distributions.DEMO_LIMIT_RULE}}
    calibration = store.calibration
    assert calibration["held_out_images"] == 16 and calibration["scored_against"] == "predicted"
    # Exemplars are training image ids of the right class.
    exemplars = store.arrays["exemplars"]
    for class_id in np.flatnonzero(store.counts):
        ids = exemplars[class_id][exemplars[class_id] >= 0]
        assert set(labels[ids]) == {class_id}
    printed = capsys.readouterr()
    assert "calibrated on 16 val samples" in printed.out
    # 6 part-B images in all: no p-value can go below 1/7, above the 10 % target.
    assert "WARNING: the verdict can never be ANOMALOUS at the 10.00% target for 8 of 8 classes" in printed.err
    assert run("describe-distributions", str(full)) == 0
    described = capsys.readouterr().out.splitlines()
    assert described[1].startswith(f"built {BUILD_TIME} from fashion-scenes: 24 training samples in 8 classes")
    assert described[2].startswith("calibrated to a 10.00% false-positive rate on 16 validation samples (10 for scales "
                                   "and tail grids, 6 ranked)")
    assert described[-1].startswith("WARNING: the verdict can never be ANOMALOUS at the 10.00% target for 8 of 8")
    assert [line for line in described if "ranked" in line and "too few" in line], described  # no scatter quoted

    for shard in ("0", "1"):
        assert run("build-distributions", *common(archive_folder), "--out", str(tmp_path / f"shard{shard}"),
                   "--limit", "24", "--top-k", "3", "--build-time", BUILD_TIME, "--shard", shard, "--num-shards", "2") == 0
    assert load_store(tmp_path / "shard0").calibration is None
    capsys.readouterr()
    assert run("merge-distributions", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "bare")) == 0
    assert load_store(tmp_path / "bare").calibration is None
    assert "merged without calibration" in capsys.readouterr().out
    for folder, last in (("shard0", "a shard: merge the shards (merge-distributions) before serving"),
                         ("bare", "not calibrated: calibrate it (recalibrate-distributions) before serving")):
        assert run("describe-distributions", str(tmp_path / folder)) == 0
        assert capsys.readouterr().out.splitlines()[-1] == last
    # Calibrating the merge with the same model at another layer would rank another layer's alpha.
    other_layer = Path(shutil.copytree(archive_folder, tmp_path / "other_layer"))
    metadata = json.loads((other_layer / model_archive.METADATA_FILE).read_text())
    (other_layer / model_archive.METADATA_FILE).write_text(json.dumps({**metadata, "layer": "features.11"}))
    with pytest.raises(ValueError, match=r"version '3' at layer 'features.11', the shards were built for "
                                         r"'scenes-mobilenet' version '3' at layer 'features'$"):
        run("merge-distributions", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "wrong"),
            *common(other_layer))
    assert not (tmp_path / "wrong").exists()
    merged = tmp_path / "merged"
    assert run("merge-distributions", str(tmp_path / "shard1"), str(tmp_path / "shard0"), "--out", str(merged),
               *common(archive_folder)) == 0
    for file in sorted(full.iterdir()):
        assert (merged / file.name).read_bytes() == file.read_bytes(), file.name

    # The merged store scores: every filter far above anything seen in training is surprising,
    # and the verdict is ANOMALOUS exactly when the p-value is under the calibrated rate.
    merged_store = load_store(merged)
    alpha = np.full((1, 576), 1e3, np.float32)
    predicted = int(np.flatnonzero(store.counts)[0])
    scores = Scorer(merged_store).score(alpha, predicted)
    assert scores.surprise_count.tolist() == [576]
    sample = scores.sample(0)
    assert sample.verdict == ("ANOMALOUS" if sample.p_value < merged_store.calibration["target_fpr"] else "NORMAL")


def test_bad_arguments_are_named(archive_folder, tmp_path, capsys):
    with pytest.raises(ValueError, match="--model: expected 'image', 'image_large', 'video', a .mar file or an archive folder"):
        run("build-distributions", "--model", str(tmp_path / "nothing.pt"), "--data", "fashion-scenes", "--out", str(tmp_path))
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 1\], got 2"):
        run("build-distributions", *common(archive_folder), "--out", str(tmp_path / "s"), "--shard", "2", "--num-shards", "2")
    with pytest.raises(SystemExit):
        run("build-distributions", *common(archive_folder), "--out", str(tmp_path / "s"), "--batch-size", "0")
    assert "argument --batch-size: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model and --data go together"):
        run("merge-distributions", str(tmp_path), "--out", str(tmp_path / "m"), "--data", "fashion-scenes")
