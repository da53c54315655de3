"""Decoding of encoded video files (MP4, WebM, AVI) into clips of the model's frame count.

The handler decodes a request's ``Clip.video`` and the store build decodes a user's video
files with :func:`decode_video`, so a served clip and a training clip are sampled alike.
PyAV's wheels carry FFmpeg; nothing else is needed.
"""

from __future__ import annotations

import io

import numpy as np

from explainserve.inputs import InputTooLarge, check_image_size

#: Container formats accepted, as FFmpeg names them, and what users call them.
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4", "matroska,webm": "WebM", "avi": "AVI"}
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
#: The most frames a video may have (20 minutes at 30 frames/s): all are demuxed to count them.
MAX_VIDEO_FRAMES = 36_000


def sample_indices(count: int, frames: int) -> np.ndarray:
    """Which of ``count`` frames make a clip of ``frames``: the middle frame of each of
    ``frames`` equal segments, so the clip spans the whole video.

    Parameters
    ----------
    count : int
        Frames available, >= 1.
    frames : int
        Frames wanted (the model's T), >= 1. With fewer available, frames repeat.

    Returns
    -------
    np.ndarray
        (frames,) int64 indices in [0, count), non-decreasing; ``arange(count)`` when equal.
    """
    if count < 1 or frames < 1:
        raise ValueError(f"frame counts must be >= 1, got {count} available and {frames} wanted")
    return ((2 * np.arange(frames, dtype=np.int64) + 1) * count) // (2 * frames)


def decode_video(data: bytes, frames: int, what: str = "video") -> np.ndarray:
    """Decode an MP4, WebM or AVI file into a (frames, H, W, 3) uint8 RGB clip.

    The frame size is checked from the stream header before any frame is decoded; the frames
    kept are :func:`sample_indices` of the video's frame count.

    Parameters
    ----------
    data : bytes
        The encoded file.
    frames : int
        T, the model's number of frames.
    what : str
        Names the input in error messages.

    Raises
    ------
    ValueError
        Empty, not a video, another container, no video stream, undecodable.
    InputTooLarge
        Frames larger than the image limits, or more than ``MAX_VIDEO_FRAMES`` frames.
    """
    import av  # imported here: the gateway and image models never need it

    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = video_stream(container, what)
            check_image_size(stream.codec_context.width, stream.codec_context.height, what=f"{what} frame")
            count = sum(1 for packet in container.demux(stream) if packet.size)
        if count == 0:
            raise ValueError(f"{what} has no frames")
        if count > MAX_VIDEO_FRAMES:
            raise InputTooLarge(f"{what} has {count} frames; the limit is {MAX_VIDEO_FRAMES}")
        wanted = sample_indices(count, frames)
        with av.open(io.BytesIO(data), mode="r") as container:
            kept = decode_selected(container, video_stream(container, what), wanted)
    except av.FFmpegError as error:
        raise ValueError(f"{what} is not a decodable MP4, WebM or AVI video: {error}") from None
    if not kept:
        raise ValueError(f"{what} has no decodable frames")
    # A stream may decode fewer frames than it has packets: the last frame stands in.
    clip = [kept.get(int(index), kept[max(kept)]) for index in wanted]
    return np.stack(clip)


def video_stream(container, what: str):
    """The first video stream of an open container of an accepted format."""
    if container.format.name not in VIDEO_CONTAINERS:
        raise ValueError(f"{what} is a {container.format.long_name} file; only MP4, WebM and AVI videos are accepted")
    if not container.streams.video:
        raise ValueError(f"{what} has no video stream")
    return container.streams.video[0]


def decode_selected(container, stream, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """Decode the stream in order and keep the frames whose index is in ``wanted``."""
    wanted_set = set(wanted.tolist())
    kept: dict[int, np.ndarray] = {}
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted_set:
            kept[index] = frame.to_ndarray(format="rgb24")
        if index >= wanted[-1]:
            break
    return kept


#: Codec written per container by :func:`encode_video`.
ENCODERS = {"mp4": "libx264", "webm": "libvpx", "avi": "mjpeg"}


def encode_video(clip: np.ndarray, container: str = "mp4", fps: int = 8) -> bytes:
    """Encode a (T, H, W, 3) uint8 clip as an MP4 (H.264), WebM (VP8) or AVI (MJPEG) file.

    For clients that hold frames and want to send a ``Clip.video``, and for tests. H.264 and
    VP8 are lossy: the decoded frames are close to, not equal to, ``clip``. H and W must be even.
    """
    import av

    if container not in ENCODERS:
        raise ValueError(f"container: expected one of {sorted(ENCODERS)}, got {container!r}")
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip: expected uint8 (T, H, W, 3), got {clip.dtype} {clip.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(ENCODERS[container], rate=fps)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuvj420p" if container == "avi" else "yuv420p"
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()
