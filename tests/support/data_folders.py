"""A user's data as files: FashionScenes images written as JPEG class folders, MovingFashion
clips as frame folders and MP4 files, and the models to build stores for them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from explainserve.data import FashionScenes, MovingFashion
from explainserve.video_files import encode_video


def folder_name(class_name: str) -> str:
    """A class name usable as a folder name (FashionScenes has "T-shirt/top")."""
    return class_name.replace("/", "-")


def jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: dict[str, int], *, size: int = 64, seed: int = 0,
                       skip_classes: tuple[str, ...] = ()) -> Path:
    """``root/<split>/<class>/<n>.jpg`` from FashionScenes: at most ``per_class[split]`` images
    of each class (the first ones of the split), none for ``skip_classes``."""
    for split, count in per_class.items():
        scenes = FashionScenes(split, seed=seed, size=count * 40, image_size=size)
        written: dict[int, int] = {}
        for index in range(len(scenes)):
            sample = scenes[index]
            name = folder_name(scenes.class_names[sample["label"]])
            if name in skip_classes or written.get(sample["label"], 0) >= count:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.jpg").write_bytes(jpeg(sample["image"]))
            written[sample["label"]] = written.get(sample["label"], 0) + 1
    return root


def write_clip_folders(root: Path, per_class: dict[str, int], *, size: int = 32, seed: int = 0,
                       videos: bool = False) -> Path:
    """MovingFashion clips as ``root/<split>/<motion>/<n>/<frame>.png`` frame folders, or as
    ``root/<split>/<motion>/<n>.mp4`` files when ``videos``."""
    for split, count in per_class.items():
        clips = MovingFashion(split, seed=seed, size=count * 40, image_size=size)
        written: dict[int, int] = {}
        for index in range(len(clips)):
            sample = clips[index]
            if written.get(sample["label"], 0) >= count:
                continue
            folder = root / split / folder_name(clips.class_names[sample["label"]])
            folder.mkdir(parents=True, exist_ok=True)
            if videos:
                (folder / f"{index:05d}.mp4").write_bytes(encode_video(sample["clip"], "mp4"))
            else:
                (folder / f"{index:05d}").mkdir()
                for t, frame in enumerate(sample["clip"]):
                    Image.fromarray(frame).save(folder / f"{index:05d}" / f"{t:03d}.png")
            written[sample["label"]] = written.get(sample["label"], 0) + 1
    return root
