"""Reading videos: container facts for discovery, and frame-sampled clips for training.

The decoder is PyAV (``pip install "tune-data[video]"``): its wheels bundle FFmpeg, so nothing else
is installed, and it decodes inside the process without a subprocess per clip. It is imported
only when a video is opened; ``import tune_data`` never needs it.

Frame sampling follows the dataset's ``video`` settings: a clip is ``num_frames`` frames taken at
``fps`` frames per second (the video's own rate when ``fps`` is unset), starting at the first
frame. A 30 fps video read at ``fps: 15`` takes every second frame; read at 60 it repeats frames.
"""

from __future__ import annotations

import math
from typing import IO, Any

import attrs
import numpy as np

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoInfo",
    "probe_video",
    "count_frames",
    "frames_at_rate",
    "frame_indices",
    "read_frames",
    "load_training_clip",
]

#: File extensions discovery treats as videos in a ``dataset_type: video`` dataset.
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".m4v"})

_INSTALL_HINT = 'video datasets need PyAV: pip install "tune-data[video]"'


def _av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return av


@attrs.frozen
class VideoInfo:
    """What the container says about a video's first video stream, without decoding it."""

    width: int
    height: int
    frames: int
    """Frame count (from the stream header, else duration x rate; exact after a full decode)."""
    fps: float
    """The stream's average frame rate."""

    @property
    def seconds(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def probe_video(handle: IO[bytes]) -> VideoInfo:
    """Size, frame count and rate of a video, from its headers. Raises for a file PyAV cannot open
    or one without a video stream (discovery drops it as ``undecodable``)."""
    av = _av()
    with av.open(handle, mode="r") as container:
        if not container.streams.video:
            raise ValueError("no video stream in the file")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        frames = int(stream.frames or 0)
        if frames <= 0:  # webm/mkv headers carry no count: estimate from the duration
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000  # av.time_base is microseconds
            else:
                seconds = 0.0
            frames = int(round(seconds * rate))
        width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise ValueError(f"video stream has no frame size ({width}x{height})")
    return VideoInfo(width, height, frames, rate)


def count_frames(handle: IO[bytes]) -> VideoInfo:
    """Like :func:`probe_video`, but the frame count comes from decoding every frame: exact, and
    a damaged stream raises (``scan_for_errors``)."""
    av = _av()
    info = probe_video(handle)
    handle.seek(0)
    with av.open(handle, mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    if frames == 0:
        raise ValueError("the video stream decodes to no frames")
    return attrs.evolve(info, frames=frames)


def frames_at_rate(info: VideoInfo, fps: float | None) -> int:
    """How many frames the video yields when sampled at ``fps`` (``None``: its own rate)."""
    if not fps or not info.fps:
        return info.frames
    return int(math.floor(info.frames * fps / info.fps + 1e-6))


def frame_indices(native_fps: float, num_frames: int, fps: float | None, start: int = 0) -> list[int]:
    """Indices (in decode order) of the frames of a clip: ``num_frames`` at ``fps``, from ``start``."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    if not fps or not native_fps:
        return [start + i for i in range(num_frames)]
    step = native_fps / fps
    return [start + int(math.floor(i * step + 1e-6)) for i in range(num_frames)]


def read_frames(handle: IO[bytes], indices: list[int]) -> np.ndarray:
    """The frames at ``indices`` (decode order, ascending; repeats allowed) as ``F x H x W x 3``
    RGB ``uint8``. Decodes from the start and stops after the last index."""
    av = _av()
    wanted: dict[int, int] = {}
    for index in indices:
        wanted[index] = wanted.get(index, 0) + 1
    last = max(indices)
    picked: list[np.ndarray] = []
    with av.open(handle, mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                array = frame.to_ndarray(format="rgb24")
                picked.extend([array] * wanted[position])
            if position >= last:
                break
    if len(picked) < len(indices):
        raise ValueError(f"the video has fewer frames than the clip needs (frame {last} asked, {position + 1} decoded)")
    return np.stack(picked)


def load_training_clip(
    storage: Any, planned: Any, *, num_frames: int, fps: float | None = None
) -> np.ndarray:
    """The training clip of a planned video: ``F x H x W x 3`` ``uint8``, every frame scaled to
    cover its bucket and cropped by the plan (as images are), ``F == num_frames``."""
    from PIL import Image

    record = planned.record
    native = float(getattr(record, "fps", 0.0) or 0.0)
    try:
        with storage.open(record.path, "rb") as handle:
            frames = read_frames(handle, frame_indices(native, num_frames, fps))
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot decode video {record.path} in {storage.root}: {exc}") from exc
    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        if image.size != planned.resize:
            image = image.resize(planned.resize, Image.Resampling.LANCZOS)
        out.append(np.asarray(image.crop(planned.crop_box), dtype=np.uint8))
    return np.stack(out)
