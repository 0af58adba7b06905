"""Decode one mp4 sample into a clip tensor: frame sampling, resize/crop, channels, scaling.

Everything here runs inside a DataLoader worker: the decoder (`data.decoder`, one of
`video_decoders.DECODERS`) creates its reader per call, so no reader (and no decoder thread)
ever exists before the workers fork.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.mp4_header import declared_size, over_budget
from datamodules.video_decoders import get_decoder

# ITU-R BT.601 luma weights, the same ones the H.264 encoder used to make Y from RGB.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_LUMA = torch.tensor(_LUMA_WEIGHTS).view(3, 1, 1, 1)  # made once: every clip uses it


class VideoDecodeError(RuntimeError):
    """An mp4 in a shard cannot be decoded; the message names the shard url and sample key."""


class ClipTooShortError(ValueError):
    """A clip has fewer frames than `num_frames` at `stride` need."""


class DecodeTimeoutError(VideoDecodeError):
    """Decoding one sample took longer than the datamodule's `decode_timeout`."""


class ClipTooLargeError(VideoDecodeError):
    """A clip declares more pixels to decode than the decode budget allows, or its frames
    could not be allocated."""


# Frames converted to float at a time: the float copy of a whole long clip is 4x its bytes.
_CONVERT_FRAMES = 16


def _is_allocation_failure(error: BaseException) -> bool:
    # numpy raises MemoryError; torch's CPU allocator a RuntimeError ("can't allocate memory").
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "allocate" in str(error))


@contextlib.contextmanager
def decode_deadline(seconds: float | None) -> Iterator[None]:
    """Raise `DecodeTimeoutError` in this block after `seconds` (a SIGALRM timer).

    Works in a process's main thread, which every DataLoader worker is. A decoder stuck in
    C code without returning to Python is interrupted only when it returns; the DataLoader's
    own `timeout` (set from `decode_timeout` when there are workers) bounds that case.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise DecodeTimeoutError(f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sample_frame_indices(
    num_available: int,
    num_frames: int | None,
    stride: int,
    random_start: bool,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of `num_frames` frames `stride` apart inside a clip of `num_available` frames.

    `num_frames=None` takes as many frames as fit from frame 0. The start is uniform over all
    valid starts when `random_start` (needs `rng`), else 0 so validation is deterministic.
    A clip shorter than the span `(num_frames - 1) * stride + 1` raises `ClipTooShortError`
    rather than repeating or padding frames, which would silently change the motion.
    """
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    if num_available < 1:
        raise ClipTooShortError("clip has no frames")
    if num_frames is None:
        num_frames = (num_available - 1) // stride + 1
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    span = (num_frames - 1) * stride + 1
    if num_available < span:
        raise ClipTooShortError(
            f"clip has {num_available} frames but {num_frames} frames at stride {stride} need {span}"
        )
    start = 0
    if random_start:
        if rng is None:
            raise ValueError("random_start needs an rng")
        start = int(rng.integers(0, num_available - span + 1))
    return start + stride * np.arange(num_frames)


def _decode_frames(data: bytes, num_frames: int | None, stride: int, random_start: bool,
                   rng: np.random.Generator | None, decoder: str = "decord") -> np.ndarray:
    """Decode the sampled frames of `data` to uint8 `(F, H, W, 3)` RGB with backend `decoder`."""
    return get_decoder(decoder)(
        data, lambda num_available: sample_frame_indices(num_available, num_frames, stride, random_start, rng)
    )


def _covering_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(target height, target width, resized height, resized width): the smallest size at the
    frames' aspect that covers the target `size` (a square side, or `(height, width)`)."""
    target_h, target_w = (size, size) if isinstance(size, int) else size
    scale = max(target_h / height, target_w / width)
    return target_h, target_w, max(target_h, round(height * scale)), max(target_w, round(width * scale))


def _resize_center_crop(frames: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize `(..., H, W)` frames, keeping their aspect, to the smallest size that covers
    `size` (a square side, or `(height, width)`), then crop the centre to it."""
    height, width = frames.shape[-2:]
    target_h, target_w, new_h, new_w = _covering_size(height, width, size)
    if (target_h, target_w) == (height, width):
        return frames
    if (new_h, new_w) != (height, width):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return frames[..., top : top + target_h, left : left + target_w]


def decode_clip(
    data: bytes,
    *,
    url: str,
    key: str,
    num_frames: int | None,
    stride: int,
    random_start: bool,
    rng: np.random.Generator | None,
    size: int | tuple[int, int] | None,
    channels: int,
    timeout: float | None = None,
    max_pixels: int | None = None,
    decoder: str = "decord",
) -> torch.Tensor:
    """Decode mp4 bytes to a float32 clip `(C, F, H, W)` in [-1, 1].

    `size=None` keeps the decoded resolution; an int is a square side, a pair (height, width). `channels` is 3 (RGB) or 1 (luma). Undecodable
    bytes raise `VideoDecodeError` naming `url` and `key`; a too-short clip raises
    `ClipTooShortError` with the same names; decoding longer than `timeout` seconds raises
    `DecodeTimeoutError`. A clip whose header declares more than `max_pixels` pixels for the
    frames to decode (width x height x frames) raises `ClipTooLargeError` before any frame is
    decoded, as does a failed allocation while decoding. `decoder` names the backend
    (`video_decoders.DECODERS`); an unknown or uninstalled one raises `DecoderUnavailableError`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    get_decoder(decoder)  # a configuration error, raised here rather than skipped as a bad sample below
    if max_pixels is not None and (declared := declared_size(data)) is not None:
        if (problem := over_budget(declared, max_pixels, num_frames)) is not None:
            raise ClipTooLargeError(f"mp4 of sample {key} in shard {url} {problem}")
    try:
        with decode_deadline(timeout):
            frames = _decode_frames(data, num_frames, stride, random_start, rng, decoder)
        return _to_clip(frames, size, channels)
    except ClipTooShortError as exc:
        raise ClipTooShortError(f"sample {key} in shard {url}: {exc}") from exc
    except DecodeTimeoutError as exc:
        raise DecodeTimeoutError(f"mp4 of sample {key} in shard {url}: {exc}") from None
    except Exception as exc:  # decord raises RuntimeError or DECORDError with long C++ traces
        if _is_allocation_failure(exc):
            raise ClipTooLargeError(f"mp4 of sample {key} in shard {url}: cannot allocate memory to decode it") from None
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise VideoDecodeError(f"cannot decode mp4 of sample {key} in shard {url}: {detail}") from exc


def _to_clip(frames: np.ndarray, size: int | tuple[int, int] | None, channels: int) -> torch.Tensor:
    """uint8 `(F, H, W, 3)` frames -> float32 `(C, F, H, W)` in [-1, 1], converted a few frames
    at a time so the float copy never holds the whole clip at its decoded size."""
    pixels = torch.from_numpy(frames)  # (F, H, W, 3) uint8
    if len(pixels) <= _CONVERT_FRAMES:  # the usual short clip: one chunk, no split/cat
        return _to_float_frames(pixels, size, channels)
    return torch.cat([_to_float_frames(chunk, size, channels) for chunk in pixels.split(_CONVERT_FRAMES)], dim=1)


def _to_float_frames(pixels: torch.Tensor, size: int | tuple[int, int] | None, channels: int) -> torch.Tensor:
    """uint8 `(f, H, W, 3)` -> contiguous float32 `(C, f, height, width)` in [-1, 1] (`size`
    as in `_resize_center_crop`; None: H, W).

    This runs for every clip the loader yields, so it is written for few tensor ops (each
    costs microseconds of dispatch on these small clips): the float copy is made directly in
    the output's `(C, f, H, W)` order, which the resize takes as `C` images of `f` planes
    (it resizes every plane alike), so no transpose copy follows; the scaling runs in place on
    that copy. Values are bit-identical to converting, resizing and scaling `(f, C, H, W)`
    frames out of place (tests/test_video_datamodule.py compares them)."""
    resize = size is not None
    if resize:
        target_h, target_w, new_h, new_w = _covering_size(*pixels.shape[1:3], size)
        if (new_h, new_w) == tuple(pixels.shape[1:3]):  # a crop only: cut the uint8 frames, convert less
            top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
            pixels, resize = pixels[:, top : top + target_h, left : left + target_w], False
    video = pixels.permute(3, 0, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # (3, f, H, W)
    if channels == 1:
        video = (video * _LUMA).sum(dim=0, keepdim=True)  # (1, f, H, W)
    if resize:
        video = _resize_center_crop(video, size)  # (C, f, height, width), a fresh tensor or a view of one
    video = video.div_(127.5).sub_(1.0)
    if resize or channels == 1:  # uint8 RGB maps into [-1, 1] exactly; a resize or luma sum may not
        video = video.clamp_(-1.0, 1.0)
    return video.contiguous()  # a crop of a resized clip is a view
