"""--data sources: image folders, clip folders, manifests, the val holdout, class mapping and
the decoding of every kind of bad file, on real files written here."""

import json

import numpy as np
import pytest
from PIL import Image

from explainserve.data.files import decode_sample
from explainserve.data.loader import class_batches
from explainserve.data.holdout import path_key
from explainserve.data.sources import open_source
from explainserve.data.stratified import STRATIFIED_RULE, allocate
from explainserve.video_files import decode_video, encode_video, sample_indices
from support.data_folders import jpeg

CLASSES = ["cat", "dog", "owl"]


def image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def folder(root, layout: dict) -> None:
    """layout: {split: {class: number of JPEGs}}"""
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                write(root / split / name / f"{i:02d}.jpg", jpeg(image(i)))


def test_imagefolder_lists_train_and_val_sorted_by_class_and_name(tmp_path):
    folder(tmp_path, {"train": {"owl": 2, "cat": 3}, "val": {"dog": 1, "owl": 1}})
    write(tmp_path / "train" / "cat" / ".DS_Store", b"x")  # file-system leftovers are not samples
    data = open_source(f"imagefolder:{tmp_path}", CLASSES)
    assert [(s.path.relative_to(tmp_path).as_posix(), s.label) for s in data.train] == [
        ("train/cat/00.jpg", 0), ("train/cat/01.jpg", 0), ("train/cat/02.jpg", 0),
        ("train/owl/00.jpg", 2), ("train/owl/01.jpg", 2)]
    assert sorted(s.label for s in data.val) == [1, 2]
    assert data.record == {"source": f"imagefolder:{tmp_path}"}


def test_unknown_classes_are_an_error_listing_unknown_and_missing(tmp_path):
    folder(tmp_path, {"train": {"cat": 1, "tiger": 1, "lion": 1}, "val": {"cat": 1}})
    with pytest.raises(ValueError, match=r"\['lion', 'tiger'\].*lacks: \['dog', 'owl'\]"):
        open_source(f"imagefolder:{tmp_path}", CLASSES)


def test_missing_val_needs_a_val_fraction_and_the_holdout_is_deterministic(tmp_path):
    folder(tmp_path, {"train": {"cat": 10, "dog": 4}})
    with pytest.raises(ValueError, match="--val-fraction"):
        open_source(f"imagefolder:{tmp_path}", CLASSES)
    data = open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=0.25)
    assert sorted(s.label for s in data.val) == [0, 0, 0, 1]  # floor(2.5 + 0.5) and floor(1 + 0.5)
    assert len(data.train) + len(data.val) == 14 and not {s.path for s in data.train} & {s.path for s in data.val}
    assert data.record["val_holdout"]["fraction"] == 0.25
    # More files in another class never move this class's holdout; the choice is stable.
    folder(tmp_path, {"train": {"dog": 9}})
    again = open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=0.25)
    assert {s.path for s in again.val if s.label == 0} == {s.path for s in data.val if s.label == 0}
    with pytest.raises(ValueError, match=r"--val-fraction: must be in \(0, 1\)"):
        open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=1.5)


def test_a_folder_of_class_folders_is_the_training_split(tmp_path):
    # torchvision's ImageFolder layout, root/<class>/<file>: training samples, val held out.
    for name, count in (("cat", 4), ("owl", 2)):
        for i in range(count):
            write(tmp_path / name / f"{i:02d}.jpg", jpeg(image(i)))
    with pytest.raises(ValueError, match="no val samples to calibrate on"):
        open_source(f"imagefolder:{tmp_path}", CLASSES)
    data = open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=0.25)
    listed = sorted((s.path.relative_to(tmp_path).as_posix(), s.label) for s in data.train + data.val)
    assert listed == [("cat/00.jpg", 0), ("cat/01.jpg", 0), ("cat/02.jpg", 0), ("cat/03.jpg", 0),
                      ("owl/00.jpg", 2), ("owl/01.jpg", 2)]
    assert sorted(s.label for s in data.val) == [0, 2]  # floor(1 + 0.5) and floor(0.5 + 0.5)
    # A folder that is not a class is named with the model's classes the data lacks.
    write(tmp_path / "tiger" / "00.jpg", jpeg(image(0)))
    with pytest.raises(ValueError, match=r"\(train\): 1 classes are not classes of the model: \['tiger'\]; "
                                         r"the model's classes the data lacks: \['dog'\]"):
        open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=0.25)


def test_a_folder_with_neither_splits_nor_class_folders_says_which_layouts_it_takes(tmp_path):
    write(tmp_path / "photos" / "2024" / "00.jpg", jpeg(image(0)))  # the parent of the data, say
    with pytest.raises(ValueError, match=r"train is not a folder \(expected <split>/<class>/<sample>, or "
                                         r"<class>/<sample> for training samples only"):
        open_source(f"imagefolder:{tmp_path}", CLASSES, val_fraction=0.25)
    folder(tmp_path / "only_val", {"val": {"cat": 1}})
    with pytest.raises(ValueError, match=r"only_val/train is not a folder \(expected <split>/<class>/<sample>\)$"):
        open_source(f"imagefolder:{tmp_path / 'only_val'}", CLASSES)


def test_manifests_csv_and_jsonl_resolve_relative_paths_names_and_indices(tmp_path):
    folder(tmp_path / "pics", {"all": {"x": 4}})
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "data.csv").write_text(
        "path,label,split\n../pics/all/x/00.jpg,dog,train\n../pics/all/x/01.jpg,2,train\n"
        "../pics/all/x/02.jpg,cat,val\n../pics/all/x/03.jpg,owl,test\n")
    data = open_source(f"manifest:{tmp_path / 'lists' / 'data.csv'}", CLASSES)
    assert [(s.path.name, s.label) for s in data.train] == [("00.jpg", 1), ("01.jpg", 2)]
    assert [(s.path.name, s.label) for s in data.val] == [("02.jpg", 0)]
    assert decode_sample(data.train[0].path, "image").shape == (16, 16, 3)
    rows = [{"path": f"../pics/all/x/{i:02d}.jpg", "label": i % 3} for i in range(4)]
    (tmp_path / "lists" / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = open_source(f"manifest:{tmp_path / 'lists' / 'data.jsonl'}", CLASSES, val_fraction=0.5)
    assert sorted(s.label for s in data.train + data.val) == [0, 0, 1, 2]
    (tmp_path / "lists" / "bad.jsonl").write_text(json.dumps({"path": "a.jpg", "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"label 3 is outside the model's class indices \[0, 2\]"):
        open_source(f"manifest:{tmp_path / 'lists' / 'bad.jsonl'}", CLASSES, val_fraction=0.5)
    (tmp_path / "lists" / "bad.csv").write_text("path,label\na.jpg,zebra\nb.jpg,cat\n")
    with pytest.raises(ValueError, match=r"\['zebra'\]"):
        open_source(f"manifest:{tmp_path / 'lists' / 'bad.csv'}", CLASSES, val_fraction=0.5)
    (tmp_path / "lists" / "nolabel.csv").write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match=r"nolabel.csv:2: each row needs a path and a label"):
        open_source(f"manifest:{tmp_path / 'lists' / 'nolabel.csv'}", CLASSES)


def test_bad_files_fail_to_decode_with_a_reason(tmp_path):
    good = jpeg(image(0))
    cases = {
        "truncated.jpg": (good[:len(good) // 3], "image"),
        "notes.txt": (b"hello", "JPEG or PNG"),
        "tiny.png": (None, "at least 8"),
        "empty.jpg": (b"", "empty"),
    }
    buffer = __import__("io").BytesIO()
    Image.fromarray(image(1, size=4)).save(buffer, format="PNG")
    cases["tiny.png"] = (buffer.getvalue(), "at least 8")
    for name, (data, reason) in cases.items():
        with pytest.raises(ValueError, match=reason):
            decode_sample(write(tmp_path / name, data), "image")
    with pytest.raises(ValueError, match="unreadable"):
        decode_sample(tmp_path / "absent.jpg", "image")
    with pytest.raises(ValueError, match="neither a clip folder nor a video file"):
        decode_sample(tmp_path / "notes.txt", "video", 4)
    with pytest.raises(ValueError, match="is a folder"):
        decode_sample(tmp_path, "image")


def test_clip_folders_sample_their_sorted_frames_to_the_model_length(tmp_path):
    frames = [np.full((16, 16, 3), 10 * t, np.uint8) for t in range(10)]
    for t in reversed(range(10)):  # written out of order: sorted by name when read
        Image.fromarray(frames[t]).save(tmp_path / f"f{t:02d}.png")
    clip = decode_sample(tmp_path, "video", 4)
    assert clip.shape == (4, 16, 16, 3)
    assert clip[:, 0, 0, 0].tolist() == [10 * i for i in sample_indices(10, 4)] == [10, 30, 60, 80]


def test_sample_indices_spread_over_the_video():
    assert sample_indices(16, 16).tolist() == list(range(16))
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert sample_indices(2, 4).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


@pytest.mark.parametrize("container", ["mp4", "webm", "avi"])
def test_video_files_decode_to_the_sampled_frames(tmp_path, container):
    # Each frame a flat grey level; lossy codecs keep flat frames within a few levels.
    levels = np.linspace(20, 235, 24).astype(np.uint8)
    clip = np.broadcast_to(levels[:, None, None, None], (24, 32, 48, 3)).copy()
    data = encode_video(clip, container)
    decoded = decode_video(data, 6)
    assert decoded.shape == (6, 32, 48, 3) and decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[:, 16, 24, 0], levels[sample_indices(24, 6)], atol=4)
    path = write(tmp_path / f"clip.{container}", data)
    np.testing.assert_array_equal(decode_sample(path, "video", 6), decoded)


def test_bad_videos_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a decodable"):
        decode_video(b"\x00" * 1000, 4)
    with pytest.raises(ValueError, match="only MP4, WebM and AVI"):
        decode_video(jpeg(image(0)), 4)
    data = encode_video(np.zeros((3, 32, 32, 3), np.uint8), "mp4")
    with pytest.raises(ValueError, match="not a decodable|no decodable|no frames|no video stream"):
        decode_video(data[:len(data) // 2], 4)


def test_class_batches_never_mix_classes():
    from explainserve.data.files import SampleFile
    samples = [SampleFile(None, label) for label in (0, 0, 0, 1, 1, 2)]
    assert class_batches(samples, list(range(6)), 2) == [[0, 1], [2], [3, 4], [5]]


def test_a_clip_message_decodes_its_one_form_to_the_model_length():
    from explainserve._generated import explain_pb2
    from explainserve.video_files import decode_clip

    levels = np.linspace(20, 235, 12).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (12, 16, 16, 3)).copy()
    video = decode_clip(explain_pb2.Clip(video=encode_video(frames, "webm")), 4)
    np.testing.assert_allclose(video[:, 8, 8, 0], levels[sample_indices(12, 4)], atol=4)
    raw = decode_clip(explain_pb2.Clip(raw=frames[:4].tobytes(), shape=[4, 16, 16, 3]), 4)
    np.testing.assert_array_equal(raw, frames[:4])
    with pytest.raises(ValueError, match="the model takes 4 frames, got 12"):
        decode_clip(explain_pb2.Clip(raw=frames.tobytes(), shape=[12, 16, 16, 3]), 4)
    with pytest.raises(ValueError, match="got raw and video"):
        decode_clip(explain_pb2.Clip(raw=frames.tobytes(), shape=[12, 16, 16, 3], video=b"x"), 4)
    with pytest.raises(ValueError, match="has neither"):
        decode_clip(explain_pb2.Clip(), 4)
    with pytest.raises(ValueError, match="clip video is not a decodable"):
        decode_clip(explain_pb2.Clip(video=b"\x00" * 64), 4)


def test_allocate_shares_the_limit_in_proportion_with_one_per_class():
    # 5 left after one each: 5 x [9, 4, 0, 0] / 13 = [3.46, 1.54, 0, 0]; the larger remainder (class 1) rounds up.
    assert allocate(np.array([10, 5, 0, 1]), 8).tolist() == [4, 3, 0, 1]
    assert allocate(np.array([5, 5, 5]), 2).tolist() == [1, 1, 0]  # fewer than the classes: ties to the lower index
    assert allocate(np.array([2, 3]), 9).tolist() == [2, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 30, rng.integers(1, 12))
        limit = int(rng.integers(1, 200))
        kept = allocate(counts, limit)
        assert kept.sum() == min(limit, counts.sum()) and (kept <= counts).all() and (kept >= 0).all()
        if limit >= (counts > 0).sum():
            assert (kept[counts > 0] >= 1).all()


def test_limits_keep_a_stratified_deterministic_choice_of_every_class(tmp_path):
    folder(tmp_path, {"train": {"cat": 6, "dog": 3, "owl": 3}, "val": {"cat": 2, "dog": 2, "owl": 2}})
    data = open_source(f"imagefolder:{tmp_path}", CLASSES, limit=6, val_limit=3)
    # One each, then 3 x [5, 2, 2] / 9 = [1.67, 0.67, 0.67]: floors [1, 0, 0], equal remainders to cat and dog.
    assert [s.label for s in data.train] == [0, 0, 0, 1, 1, 2]
    # One val sample of each class, not the first three of the listing (two cats and a dog).
    assert sorted(s.label for s in data.val) == [0, 1, 2]
    assert data.record["limit"] == {"train": 6, "rule": STRATIFIED_RULE}
    assert data.record["val_limit"] == {"val": 3, "rule": STRATIFIED_RULE}
    again = open_source(f"imagefolder:{tmp_path}", CLASSES, limit=6, val_limit=3)
    assert again.train == data.train and again.val == data.val
    # The choice within a class is by the sha256 of the path: a larger limit keeps a superset.
    wider = open_source(f"imagefolder:{tmp_path}", CLASSES, limit=9)  # [5, 2, 2]
    assert np.bincount([s.label for s in wider.train]).tolist() == [5, 2, 2]
    assert {s.path for s in data.train} <= {s.path for s in wider.train}
    cats = sorted((s.path for s in open_source(f"imagefolder:{tmp_path}", CLASSES).train if s.label == 0),
                  key=lambda path: path_key(path, tmp_path))
    assert {s.path for s in data.train if s.label == 0} == set(cats[:3])
