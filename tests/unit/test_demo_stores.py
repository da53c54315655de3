"""The committed demo distribution stores, and archives that carry them under distribution_store/."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from explainserve.anomaly import Scorer, StoreError, load_store
from explainserve.anomaly.store import ARRAY_SPECS, MANIFEST, calibration_specs
from explainserve.cli import main as cli
from explainserve.commands.archive import demo_model, demo_store
from explainserve.model_archive import STORE_FOLDER, write_archive


def store_files(folder: Path) -> list[str]:
    """A calibrated store's files: its manifest, the class arrays and the calibration's (with the
    feature block when it was calibrated with features)."""
    section = json.loads((folder / MANIFEST).read_text())["calibration"]
    return sorted([MANIFEST, *(f"{name}.npy" for name in (*ARRAY_SPECS, *calibration_specs(section)))])


def committed(kind: str):
    folder, record, weights = demo_store(kind)
    if record is None:
        pytest.skip(f"no committed {kind} store")
    return folder, record, weights


@pytest.mark.parametrize("kind", ["image", "image_large", "video"])
def test_committed_store_is_for_the_served_demo_model_and_its_weights(kind):
    folder, record, weights = committed(kind)
    _, metadata = demo_model(kind)
    store = load_store(folder, model_name=metadata["name"], model_version=metadata["version"])
    assert record["weights_sha256"] == weights, "the demo weights changed: rebuild the store (see its record)"
    assert record["store_sha256"] == store.sha256
    assert record["model"] == {"name": f"demo_{kind}", "version": "1.0"}
    assert list(store.meta.class_names) == metadata["class_names"] and store.meta.layer == metadata["layer"]
    assert store.calibration["scored_against"] == "predicted"
    assert int(store.counts.sum()) == record["train_images"]
    Scorer(store)


def archive_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_demo_archive_ships_a_loadable_store_under_distribution_store(tmp_path, capsys):
    folder, _, _ = committed("image")
    assert cli(["archive", "--demo", "image", "--export-path", str(tmp_path)]) == 0
    assert "with the distribution store" in capsys.readouterr().out
    mar = tmp_path / "demo_image.mar"
    names = archive_names(mar)
    assert sorted(n for n in names if n.startswith(f"{STORE_FOLDER}/")) == [f"{STORE_FOLDER}/{f}" for f in store_files(folder)]
    # Nothing of the store lands at the top level (torch-model-archiver flattens folders).
    assert not any(name in names for name in store_files(folder))
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp_path / "unpacked")
        metadata = json.loads(archive.read("metadata.json"))
    store = load_store(tmp_path / "unpacked" / STORE_FOLDER, model_name=metadata["name"],
                       model_version=metadata["version"])
    assert store.sha256 == load_store(folder).sha256
    batch = Scorer(store).score(np.asarray(store.arrays["mean"][0], dtype=np.float32), 0)
    assert batch.anomalous.shape == (1,)


def test_demo_archive_under_another_name_ships_no_store(tmp_path, capsys):
    committed("image")
    assert cli(["archive", "--demo", "image", "--name", "other", "--export-path", str(tmp_path)]) == 0
    assert "no distribution store shipped" in capsys.readouterr().out
    assert not any(n.startswith(f"{STORE_FOLDER}/") for n in archive_names(tmp_path / "other.mar"))
    assert cli(["archive", "--demo", "image", "--no-store", "--export-path", str(tmp_path / "none")]) == 0
    assert not any(n.startswith(f"{STORE_FOLDER}/") for n in archive_names(tmp_path / "none" / "demo_image.mar"))


def test_archive_refuses_a_store_of_another_model_or_a_corrupt_one(tmp_path):
    folder, _, _ = committed("image")
    model, metadata = demo_model("image", name="other")
    with pytest.raises(StoreError, match="built for model 'demo_image'"):
        write_archive(model, metadata, tmp_path, store_path=folder)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in store_files(folder):
        (corrupt / name).write_bytes((folder / name).read_bytes())
    data = bytearray((corrupt / "mean.npy").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "mean.npy").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        write_archive(*demo_model("image"), tmp_path, store_path=corrupt)
    assert not (tmp_path / "other.mar").exists() and not (tmp_path / "demo_image.mar").exists()


def test_demo_command_archives_carry_their_stores(tmp_path, capsys):
    from explainserve.commands.demo import ensure_demo_archives

    for kind in ("image", "video"):
        committed(kind)
    assert ensure_demo_archives(tmp_path, None) == ["demo_image", "demo_video"]
    assert capsys.readouterr().out.count("with its distribution store") == 2
    for name in ("demo_image", "demo_video"):
        assert f"{STORE_FOLDER}/{MANIFEST}" in archive_names(tmp_path / f"{name}.mar")


@pytest.mark.slow
def test_the_image_store_is_the_calibration_of_the_demo_models_held_out_images():
    # The committed store was calibrated on the first 16072 FashionScenes val composites, scored
    # against the predicted class (stores/image.json). Recomputing the served alpha of all of
    # them would take four times this test; the first 4018 (one per val item) are recomputed
    # instead. Part A / part B is decided by each image's position among the images of its
    # predicted class in dataset order, so these images' parts are those of the full split:
    # every part-B image's four statistics must be in its class's committed ranks, every class
    # ranks on its own images with thresholds of its own, on at least 900 of them.
    from explainserve.anomaly.calibration import split_parts
    from explainserve.data import FashionScenes
    from explainserve.explainer import Explainer

    folder, record, _ = committed("image")
    model, metadata = demo_model("image")
    store = load_store(folder)
    explainer = Explainer(model, kind="image", input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata["layer"])
    val = FashionScenes("val", seed=0, size=record["val_images"], image_size=metadata["input_size"][0])
    assert record["val_images"] == store.calibration["held_out_images"] == 16072
    first = len(val.item_indices())
    alphas, predicted = [], []
    for start in range(0, first, 512):
        results = explainer.explain([val[i]["image"] for i in range(start, min(start + 512, first))], methods=[])
        alphas += [result.alpha for result in results]
        predicted += [result.predicted for result in results]
    alphas, predicted = np.stack(alphas), np.asarray(predicted)

    scorer = Scorer(store)
    scores = scorer.score(alphas, predicted)
    assert scores.from_class.all(), "a class is on the class-independent group"
    assert min(store.calibration["classes"]["count"]) >= 900
    ranks = np.asarray(store.arrays["class_ranks"])
    part_b = split_parts(predicted)
    for row in np.flatnonzero(part_b):
        held = ranks[predicted[row]]
        for statistic, value in enumerate(scores.statistics[row]):  # two processes may differ in the last bits
            assert np.isclose(held[statistic], value, rtol=1e-4, atol=1e-6).any(), (row, statistic)
    critical = {tuple(row) for row in store.calibration["classes"]["critical"]}
    assert len(critical) == store.num_classes, "classes share their thresholds"


def test_describe_distributions_says_what_the_committed_image_store_holds(capsys):
    folder, _, _ = committed("image")
    assert cli(["describe-distributions", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    store = load_store(folder)
    assert lines[0] == (f"{folder}: model 'demo_image' version '1.0', layer 'features.6', 128 filters, format 3, "
                        f"sha256 {store.sha256[:16]}")
    assert lines[1].endswith(f"{int(store.counts.sum())} training samples in 8 classes (0 without any), serving arrays "
                             f"{store.serving_bytes() / 1e6:.1f} MB")
    assert lines[2] == ("calibrated to a 1.00% false-positive rate on 16072 validation samples (8038 for scales and "
                        "tail grids, 8034 ranked), scored against the predicted class")
    counts = store.calibration["classes"]["count"]
    # sqrt(0.01 / n) in points: 1000 ranked give 0.32, the smallest class's ranks a little more
    assert lines[3] == (f"  8 classes ranked on their own samples ({min(counts)}-{max(counts)} each: the realised rate "
                        f"scatters by about ±0.32-{100 * (0.01 / min(counts)) ** 0.5:.2f} points per class)")
    assert lines[4:] == ["  pooled-feature tests: 128 features, rank 128"]  # no warning: every class can be flagged
