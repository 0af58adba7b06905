"""Probe a video (frames, fps, size, codec) by decoding it with PyAV; probe a still image with PIL."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av


class ProbeError(Exception):
    """A media file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class VideoProbeError(ProbeError):
    """A video that cannot be used: unreadable, no video stream, or no decodable frame."""


class ImageProbeError(ProbeError):
    """An image that cannot be decoded."""


def _reason(error: Exception) -> str:
    # FFmpeg errors repeat the file name in str(); the path is already in ProbeError's message.
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


@dataclass(frozen=True)
class VideoProbe:
    path: str
    num_frames: int  # counted by decoding, not read from the header
    fps: float
    width: int
    height: int
    duration: float  # seconds, num_frames / fps
    codec: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_video(
    path: str | Path, data: bytes | None = None, on_frame: Callable[[av.VideoFrame], None] | None = None
) -> VideoProbe:
    """Decode every frame of the video at `path` (or of `data`, named `path`) and report it.

    `on_frame` sees each decoded frame in order, so an analysis (cut detection) shares this
    one decoding pass. Raises `VideoProbeError` for an unreadable file, no video stream, or
    zero decodable frames.
    """
    source = io.BytesIO(data) if data is not None else str(path)
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise VideoProbeError(path, "no video stream")
            stream = container.streams.video[0]
            # One decoding thread: these clips are tiny and thread start-up dominates otherwise.
            stream.codec_context.thread_count = 1
            num_frames = 0
            for frame in container.decode(stream):
                if on_frame is not None:
                    on_frame(frame)
                num_frames += 1
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
    except VideoProbeError:
        raise
    except FileNotFoundError as error:
        raise VideoProbeError(path, "file not found") from error
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoProbeError(path, f"cannot decode: {_reason(error)}") from error
    if num_frames == 0:
        raise VideoProbeError(path, "zero decodable frames")
    duration = num_frames / fps if fps > 0 else 0.0
    return VideoProbe(str(path), num_frames, round(fps, 6), width, height, round(duration, 6), codec)


@dataclass(frozen=True)
class ImageProbe:
    path: str
    width: int
    height: int
    format: str  # "PNG", "JPEG", ...
    mode: str  # PIL mode, e.g. "RGB"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_image(path: str | Path) -> ImageProbe:
    """Fully decode the image at `path` and report its size; `ImageProbeError` if it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode the pixels, not only the header
            return ImageProbe(str(path), image.width, image.height, image.format or "", image.mode)
    except FileNotFoundError as error:
        raise ImageProbeError(path, "file not found") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageProbeError(path, f"cannot decode image: {_reason(error)}") from error
