"""A user's samples as files, and how one is decoded: exactly as the handler decodes a request.

A sample is an image file (JPEG or PNG) for an image model; for a video model, a video file
(MP4, WebM, AVI) or a folder of frame files (sorted by name). The bytes go through the very
functions the handler applies to a request carrying them (:func:`explainserve.inputs.decode_image`,
:func:`explainserve.inputs.decode_frames`, :func:`explainserve.video_files.decode_video`), so a
training sample and the same file sent to Explain reach the network identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explainserve.inputs import decode_frames, decode_image
from explainserve.video_files import VIDEO_SUFFIXES, decode_video, sample_indices


@dataclass(frozen=True)
class SampleFile:
    """One labelled sample on disk.

    Attributes
    ----------
    path : Path
        An image or video file, or a clip folder of frame files.
    label : int
        Index into the model's class names.
    """

    path: Path
    label: int


def visible(path: Path) -> bool:
    """Whether a folder entry is data (names starting with '.' are file-system leftovers)."""
    return not path.name.startswith(".")


def frame_files(folder: Path) -> list[Path]:
    """A clip folder's frame files, sorted by name."""
    return sorted((entry for entry in folder.iterdir() if visible(entry) and entry.is_file()), key=lambda p: p.name)


def decode_sample(path: Path, kind: str, frames: int | None = None) -> np.ndarray:
    """Read and decode one sample as the handler decodes a request holding its bytes.

    Parameters
    ----------
    path : Path
        Image file (kind "image"); video file or clip folder (kind "video").
    kind : {"image", "video"}
    frames : int, optional
        T, the video model's number of frames: a clip folder's frame files and a video's
        frames are sampled to it (:func:`explainserve.video_files.sample_indices`).

    Returns
    -------
    np.ndarray
        uint8 (H, W, 3) image or (T, H, W, 3) clip, at the file's own size.

    Raises
    ------
    ValueError
        Unreadable, corrupt, too small or too large, or of the wrong kind; the message names
        the path.
    """
    try:
        if kind == "image":
            if path.is_dir():
                raise ValueError("is a folder; an image model takes image files")
            return decode_image(path.read_bytes(), what="image")
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise ValueError("is a clip folder without frame files")
            return decode_frames([files[i].read_bytes() for i in sample_indices(len(files), frames)])
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"is neither a clip folder nor a video file ({', '.join(VIDEO_SUFFIXES)})")
        return decode_video(path.read_bytes(), frames)
    except OSError as error:
        raise ValueError(f"{path}: unreadable ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def default_workers() -> int:
    """Decoding processes: one per core the network pass does not need, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))
