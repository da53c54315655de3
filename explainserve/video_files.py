"""Decoding of encoded video files (MP4, WebM, AVI) into clips of the model's frame count.

The handler decodes a request's ``Clip.video`` and the store build decodes a user's video
files with :func:`decode_video`, so a served clip and a training clip are sampled alike.
PyAV's wheels carry FFmpeg; nothing else is needed.
"""

from __future__ import annotations

import io

import numpy as np

from explainserve.inputs import (InputTooLarge, check_frames, check_image_size, check_raw_clip,
                                 check_request_pixels, decode_frames, raw_clip)

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


def check_video(data: bytes, frames: int, what: str = "video") -> None:
    """Check an encoded video from its container header alone, before any frame is decoded:
    an MP4, WebM or AVI with a video stream whose frame size is within the image limits and
    whose ``frames`` sampled frames are within the request's decoded-pixel limit.

    Raises
    ------
    ValueError
        Empty, not a video, another container, no video stream, an unreadable header.
    InputTooLarge
        Frames larger than the limits.
    """
    import av  # imported here: image models never need it

    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            video_stream(container, frames, what)
    except av.FFmpegError as error:
        raise ValueError(f"{what} is not a decodable MP4, WebM or AVI video: {error}") from None


def decode_video(data: bytes, frames: int, what: str = "video") -> np.ndarray:
    """Decode an MP4, WebM or AVI file into a (frames, H, W, 3) uint8 RGB clip.

    The header is checked first (:func:`check_video`); the frames kept are
    :func:`sample_indices` of the video's frame count, counted from its packets.

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
        As :func:`check_video`, or undecodable frames.
    InputTooLarge
        As :func:`check_video`, or more than ``MAX_VIDEO_FRAMES`` frames.
    """
    import av

    check_video(data, frames, what)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = video_stream(container, frames, what)
            count = sum(1 for packet in container.demux(stream) if packet.size)
        if count == 0:
            raise ValueError(f"{what} has no frames")
        if count > MAX_VIDEO_FRAMES:
            raise InputTooLarge(f"{what} has {count} frames; the limit is {MAX_VIDEO_FRAMES}")
        wanted = sample_indices(count, frames)
        with av.open(io.BytesIO(data), mode="r") as container:
            kept = decode_selected(container, video_stream(container, frames, what), wanted)
    except av.FFmpegError as error:
        raise ValueError(f"{what} is not a decodable MP4, WebM or AVI video: {error}") from None
    if not kept:
        raise ValueError(f"{what} has no decodable frames")
    # A stream may decode fewer frames than it has packets: the last frame stands in.
    clip = [kept.get(int(index), kept[max(kept)]) for index in wanted]
    return np.stack(clip)


def video_stream(container, frames: int, what: str):
    """The first video stream of an open container of an accepted format, its size checked
    for a clip of ``frames`` frames."""
    if container.format.name not in VIDEO_CONTAINERS:
        raise ValueError(f"{what} is a {container.format.long_name} file; only MP4, WebM and AVI videos are accepted")
    if not container.streams.video:
        raise ValueError(f"{what} has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    check_image_size(width, height, what=f"{what} frame")
    check_request_pixels(frames, width, height, what=what)
    return stream


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


def clip_form(clip) -> str:
    """Which input an ``explainserve.v1.Clip`` message carries: "frames", "raw" or "video".

    Raises ValueError when it carries none or more than one.
    """
    given = [name for name, present in (("frames", bool(clip.frames)), ("raw", bool(clip.raw or clip.shape)),
                                        ("video", bool(clip.video))) if present]
    if not given:
        raise ValueError("clip: has neither `frames`, `raw` pixels nor a `video` file")
    if len(given) > 1:
        raise ValueError(f"clip: give one of `frames`, `raw` with `shape`, or `video`; got {' and '.join(given)}")
    return given[0]


def check_clip(clip, frames: int) -> None:
    """Check a Clip message for a model of ``frames`` frames from headers alone (the gateway)."""
    form = clip_form(clip)
    if form == "video":
        check_video(clip.video, frames, what="clip video")
    elif form == "frames":
        check_frames(list(clip.frames), frames)
    else:
        check_raw_clip(len(clip.raw), list(clip.shape), frames)


def decode_clip(clip, frames: int) -> np.ndarray:
    """Decode a Clip message into the (frames, H, W, 3) uint8 clip (the video handler).

    A ``video`` is sampled to ``frames`` as build-distributions samples video files;
    ``frames`` or ``raw`` pixels must have that many already.
    """
    form = clip_form(clip)
    if form == "video":
        return decode_video(clip.video, frames, what="clip video")
    if form == "frames":
        return decode_frames(list(clip.frames), frames)
    return raw_clip(clip.raw, list(clip.shape), frames)
