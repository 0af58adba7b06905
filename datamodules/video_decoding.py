"""Decode one mp4 sample into uint8 frames (frame sampling, resize/crop), and uint8 frames
into the model's float clip (channels, scaling).

Everything here runs inside a DataLoader worker: the decoder (`data.decoder`, one of
`video_decoders.DECODERS`) creates its reader per call, so no reader (and no decoder thread)
ever exists before the workers fork.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from data_tools.mp4_header import declared_size, over_budget
from datamodules.video_decoders import get_decoder

# ITU-R BT.601 luma weights, the same ones the H.264 encoder used to make Y from RGB.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class VideoDecodeError(RuntimeError):
    """An mp4 in a shard cannot be decoded; the message names the shard url and sample key."""


class ClipTooShortError(ValueError):
    """A clip has fewer frames than `num_frames` at `stride` need."""


class DecodeTimeoutError(VideoDecodeError):
    """Decoding one sample took longer than the datamodule's `decode_timeout`."""


class ClipTooLargeError(VideoDecodeError):
    """A clip declares more pixels to decode than the decode budget allows, or its frames
    could not be allocated."""


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


def decode_frames(
    data: bytes,
    *,
    url: str,
    key: str,
    num_frames: int | None,
    stride: int,
    random_start: bool,
    rng: np.random.Generator | None,
    size: int | tuple[int, int] | None,
    timeout: float | None = None,
    max_pixels: int | None = None,
    decoder: str = "decord",
) -> torch.Tensor:
    """Decode mp4 bytes to the sampled frames as uint8 RGB `(F, H, W, 3)`, resized and centre
    cropped to `size` (None keeps the decoded resolution; an int is a square side, a pair
    (height, width)). `frames_to_video` makes the model's float clip of them, on any device.

    Undecodable bytes raise `VideoDecodeError` naming `url` and `key`; a too-short clip raises
    `ClipTooShortError` with the same names; decoding longer than `timeout` seconds raises
    `DecodeTimeoutError`. A clip whose header declares more than `max_pixels` pixels for the
    frames to decode (width x height x frames) raises `ClipTooLargeError` before any frame is
    decoded, as does a failed allocation while decoding. `decoder` names the backend
    (`video_decoders.DECODERS`); an unknown or uninstalled one raises `DecoderUnavailableError`.
    """
    get_decoder(decoder)  # a configuration error, raised here rather than skipped as a bad sample below
    if max_pixels is not None and (declared := declared_size(data)) is not None:
        if (problem := over_budget(declared, max_pixels, num_frames)) is not None:
            raise ClipTooLargeError(f"mp4 of sample {key} in shard {url} {problem}")
    try:
        with decode_deadline(timeout):
            frames = _decode_frames(data, num_frames, stride, random_start, rng, decoder)
        pixels = torch.from_numpy(frames)  # (F, H, W, 3) uint8
        return pixels if size is None else resize_center_crop_frames(pixels, size)
    except ClipTooShortError as exc:
        raise ClipTooShortError(f"sample {key} in shard {url}: {exc}") from exc
    except DecodeTimeoutError as exc:
        raise DecodeTimeoutError(f"mp4 of sample {key} in shard {url}: {exc}") from None
    except Exception as exc:  # decord raises RuntimeError or DECORDError with long C++ traces
        if _is_allocation_failure(exc):
            raise ClipTooLargeError(f"mp4 of sample {key} in shard {url}: cannot allocate memory to decode it") from None
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise VideoDecodeError(f"cannot decode mp4 of sample {key} in shard {url}: {detail}") from exc


def decode_clip(data: bytes, *, channels: int, **options: Any) -> torch.Tensor:
    """Decode mp4 bytes to a float32 clip `(C, F, H, W)` in [-1, 1]: `decode_frames(data,
    **options)` made into the model's clip by `frames_to_video`. `channels` is 3 (RGB) or 1 (luma)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return frames_to_video(decode_frames(data, **options), channels)


def resize_center_crop_frames(pixels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 `(F, H, W, 3)` frames resized, keeping their aspect, to the smallest size that
    covers `size` (antialiased bilinear), then centre-cropped to it: `(F, height, width, 3)`.

    The resize runs on the uint8 frames (torch's uint8 kernel, ~10x faster than on floats at
    256p and above; within one level of the float resize, rounded). A clip that only needs a
    crop comes back as a view of `pixels`."""
    target_h, target_w, new_h, new_w = _covering_size(*pixels.shape[1:3], size)
    if (new_h, new_w) != tuple(pixels.shape[1:3]):
        planes = pixels.permute(0, 3, 1, 2)  # (F, 3, H, W), channels-last in memory: what the uint8 kernel takes
        planes = F.interpolate(planes, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        pixels = planes.permute(0, 2, 3, 1)  # (F, new_h, new_w, 3), contiguous
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return pixels[:, top : top + target_h, left : left + target_w]


def frames_to_video(frames: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 RGB frames `(..., F, H, W, 3)` (a clip or a batch of them) -> float32 `(..., C, F,
    H, W)` in [-1, 1], on the frames' device; `channels` 1 is BT.601 luma.

    The loaders yield uint8 frames and the datamodule converts them after the batch reaches
    the model's device (`on_after_batch_transfer`): a quarter of the bytes to copy between
    processes and to the accelerator, and no float work in the loader workers."""
    if channels == 1:
        luma = (frames.float() * torch.tensor(_LUMA_WEIGHTS, device=frames.device)).sum(dim=-1)  # (..., F, H, W)
        video = luma.clamp_(0.0, 255.0).unsqueeze(-4)  # (..., 1, F, H, W)
    elif channels == 3:
        # Transposed as uint8, then converted: 1.7x faster on a CPU than transposing floats
        # (12 vs 20 ms for a 16x256x256 clip on the 2-core machine).
        video = rearrange(frames, "... f h w c -> ... c f h w").contiguous().float()
    else:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return video.div_(127.5).sub_(1.0)
