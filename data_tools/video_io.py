"""Encoding and decoding of mp4 clips with PyAV, shared by the data tools and sample writers."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

from data_tools.atomic_files import write_atomic


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 10, preset: str | None = None) -> bytes:
    """Encode uint8 frames `(F, H, W, 3)` (or `(F, H, W)` grayscale) to H.264 mp4 bytes.

    H.264 with yuv420p needs even sizes; odd sizes are rejected rather than silently padded
    so that the decoded clip always has the shape that was written. A low CRF keeps the
    tiny digit canvases nearly lossless. `preset` is libx264's speed/size trade-off
    ("ultrafast" .. "veryslow"; None: its default, "medium").
    """
    if frames.dtype != np.uint8:
        raise ValueError(f"encode_mp4 expects uint8 frames, got {frames.dtype}")
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_mp4 expects (F, H, W, 3) frames, got shape {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread and no B-frame look-ahead: deterministic bytes for a given input.
        stream.options = {"crf": str(crf), "threads": "1", "bf": "0", **({"preset": preset} if preset else {})}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0, crf: int = 10) -> Path:
    """Encode `frames` and write them to `path` through a temporary name, so a crash never
    leaves a truncated mp4 behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, encode_mp4(frames, fps=fps, crf=crf))


def decode_mp4(data: bytes | str | Path) -> np.ndarray:
    """Decode every frame of an mp4 (bytes or path) with PyAV to uint8 `(F, H, W, 3)`."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
    with av.open(source) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("video decodes to zero frames")
    return np.stack(frames)
