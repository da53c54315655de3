"""FashionScenes and MovingFashion: determinism, exact masks, disjoint OOD splits, bad input."""

import gzip

import numpy as np
import pytest

from explainserve.data import (FASHION_MNIST_CLASSES, IN_CLASSES, MOTIONS, OOD_CLASSES, FashionScenes,
                               MovingFashion, load_fashion_mnist, read_idx)
from explainserve.data.backgrounds import IN_DISTRIBUTION_PHOTOS, OOD_PHOTOS
from explainserve.data.compose import MASK_THRESHOLD, bounding_box, paste, render_item


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-5], "holds 19 bytes"),
    (lambda raw: b"\x01" + raw[1:], "bad magic"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "not unsigned byte"),
])
def test_read_idx_corrupt_names_file_and_mismatch(tmp_path, damage, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(damage(_idx_bytes(np.zeros((2, 3, 4)))))
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=str(path)):
        read_idx(path)


def test_missing_dataset_names_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_official_parts_load():
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10


def test_same_seed_same_bytes_any_access_order():
    first = FashionScenes("train", seed=3, size=6).batch()
    again = FashionScenes("train", seed=3, size=6)
    assert again[4]["image"].tobytes() == first.images[4].tobytes()  # random access first
    second = again.batch()
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    other = FashionScenes("train", seed=4, size=6).batch()
    assert other.images.tobytes() != first.images.tobytes()


def test_batch_types_and_shapes():
    batch = FashionScenes("val", size=4, image_size=80).batch()
    assert batch.images.shape == (4, 80, 80, 3) and batch.images.dtype == np.uint8
    assert batch.labels.dtype == np.int64 and batch.masks.dtype == bool and batch.masks.shape == (4, 80, 80)
    assert batch.boxes.shape == (4, 4)
    assert FashionScenes("val", size=1).class_names == [FASHION_MNIST_CLASSES[c] for c in IN_CLASSES]


def test_mask_is_exactly_the_pasted_pixels():
    scenes = FashionScenes("test", seed=1, size=8)
    for index in range(len(scenes)):
        sample, background = scenes[index], scenes.background(index)
        mask = sample["mask"]
        assert 100 < mask.sum() < mask.size / 2
        # Outside the mask the scene is the background, byte for byte.
        np.testing.assert_array_equal(sample["image"][~mask], background[~mask])
        # Inside, the item replaced it (a pixel can coincide with the background only by chance).
        changed = (sample["image"][mask] != background[mask]).any(axis=1)
        assert changed.mean() > 0.95
        y0, x0, y1, x1 = sample["box"]
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


def test_paste_hand_computed():
    canvas = np.full((6, 6, 3), 10.0, dtype=np.float32)
    intensity = np.array([[0, 255], [MASK_THRESHOLD, MASK_THRESHOLD - 1]], dtype=np.uint8)
    colour = np.array([1.0, 0.5, 0.0], dtype=np.float32)
    mask = paste(canvas, intensity, centre=(3.0, 4.0), colour=colour)  # top-left corner at (2, 3)
    expected = np.zeros((6, 6), dtype=bool)
    expected[2, 4] = expected[3, 3] = True
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(canvas[2, 4], [255.0, 127.5, 0.0])
    np.testing.assert_allclose(canvas[3, 3], 255 * (0.35 + 0.65 * MASK_THRESHOLD / 255) * colour, rtol=1e-6)
    assert (canvas[~expected] == 10.0).all()
    assert bounding_box(expected).tolist() == [2, 3, 4, 5]
    # Clipped at the border: only the in-frame part is pasted.
    corner = paste(np.zeros((3, 3, 3), np.float32), np.full((2, 2), 255, np.uint8), (0.0, 0.0), colour)
    assert corner.sum() == 1 and corner[0, 0]


def test_ood_splits_are_disjoint_from_training():
    train, val = FashionScenes("train", size=1), FashionScenes("val", size=1)
    _, train_labels = load_fashion_mnist("train")
    assert not np.isin(train_labels[train.item_indices()], OOD_CLASSES).any()
    assert not set(train.item_indices()) & set(val.item_indices())
    ood_classes = FashionScenes("ood_classes", size=20)
    samples = list(ood_classes)
    assert {s["fashion_class"] for s in samples} <= set(OOD_CLASSES) and {s["label"] for s in samples} == {-1}
    assert ood_classes.ood_class_names == ["Shirt", "Bag"]
    assert set(OOD_PHOTOS).isdisjoint(IN_DISTRIBUTION_PHOTOS)
    assert set(train.source.photos) == set(IN_DISTRIBUTION_PHOTOS)
    assert set(FashionScenes("ood_backgrounds", size=1).source.photos) == set(OOD_PHOTOS)
    assert FashionScenes("test", size=1).source.part == "test" and train.source.part == "train"


@pytest.mark.parametrize("kwargs, parameter", [
    ({"split": "training"}, "split"),
    ({"split": "train", "size": 0}, "size"),
    ({"split": "train", "seed": -1}, "seed"),
    ({"split": "train", "image_size": 16}, "image_size"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=f"^{parameter}:"):
        FashionScenes(**kwargs)


def test_moving_fashion_clips_and_tubes():
    clips = MovingFashion("test", seed=2, size=3)
    batch = clips.batch()
    assert batch.clips.shape == (3, 16, 64, 64, 3) and batch.masks.shape == (3, 16, 64, 64)
    assert batch.boxes.shape == (3, 16, 4)
    assert clips.class_names == list(MOTIONS) and len(MOTIONS) >= 6
    again = MovingFashion("test", seed=2, size=3).batch()
    assert again.clips.tobytes() == batch.clips.tobytes() and again.masks.tobytes() == batch.masks.tobytes()
    # The background is static: pixels outside every frame's mask never change.
    for clip, masks in zip(batch.clips, batch.masks):
        never = ~masks.any(axis=0)
        assert (clip[:, never] == clip[0, never]).all()
        assert masks.reshape(16, -1).sum(1).min() > 50


def _motion_samples(motion, count=3):
    clips = MovingFashion("val", seed=5, size=80)
    picked = [s for s in clips if clips.class_names[s["label"]] == motion]
    assert len(picked) >= count
    return picked[:count]


@pytest.mark.parametrize("motion, axis, sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_translations_move_the_mask_centroid(motion, axis, sign):
    for sample in _motion_samples(motion):
        centroids = np.array([np.argwhere(m).mean(0) for m in sample["mask"]])
        shift = centroids[-1] - centroids[0]
        assert sign * shift[axis] > 10 and abs(shift[1 - axis]) < 4


@pytest.mark.parametrize("motion, sign", [("grow", 1), ("shrink", -1)])
def test_scaling_changes_the_mask_area(motion, sign):
    for sample in _motion_samples(motion):
        areas = sample["mask"].reshape(16, -1).sum(1)
        assert sign * (areas[-1] - areas[0]) > 0.5 * areas.min()


def test_moving_fashion_rejects_ood_classes_split():
    with pytest.raises(ValueError, match="^split:"):
        MovingFashion("ood_classes")


def test_rotate_cw_turns_clockwise_as_displayed():
    bar = np.zeros((28, 28), dtype=np.uint8)
    bar[2:26, 12:16] = 255  # a vertical bar
    for angle, top_goes in ((-30.0, "right"), (30.0, "left")):  # rotate-cw uses negative PIL angles
        rows = np.argwhere(render_item(bar, 28, angle) >= MASK_THRESHOLD)
        top = rows[rows[:, 0] <= rows[:, 0].min() + 2, 1].mean()
        bottom = rows[rows[:, 0] >= rows[:, 0].max() - 2, 1].mean()
        assert (top > bottom) == (top_goes == "right")
