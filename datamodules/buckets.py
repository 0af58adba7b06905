"""Aspect-ratio and length buckets: a table of clip shapes (frames x height x width), each with
its own batch size and share of the batches, and the rule that puts a clip in one of them.

The table is data config (`data.buckets`), as Open-Sora's `bucket_config` is:

    buckets:
      - {frames: 16, height: 32, width: 32, batch_size: 16, weight: 2}
      - {frames: 16, height: 24, width: 40, batch_size: 16, weight: 1}
      - {frames: 32, height: 24, width: 40, batch_size: 8}

**Which bucket.** A clip of `w x h` pixels and `n` frames *fits* a bucket when it has the
frames (`n >= (frames - 1) * stride + 1`) and covering the bucket's `height x width` at the
clip's own aspect ratio needs no upscaling (`max(height / h, width / w) <= max_upscale`,
1.0 by default). Of the buckets it fits, a clip goes to the ones whose aspect ratio is
closest to its own (within 5 %), and of those to the largest (frames x height x width). It
is then resized, keeping its aspect, to cover the bucket, and the rest is cropped around the
centre. A clip that fits no bucket is counted and named, never upscaled or padded.

**Weights.** A bucket's `weight` is its share of the batches (not of the clips: buckets have
different batch sizes). Without weights, every bucket's share follows its clips: `clips /
batch_size`, so an epoch uses each clip about once.

The size and frame count of a clip come from its json (`width`, `height`, `num_frames` or
`frames`; video2dataset's `video_metadata.streams`), and when the json lacks them, from the
mp4 header (`data_tools.mp4_header`); nothing is decoded to choose a bucket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_tools.mp4_header import declared_size

MAX_UPSCALE_LIMIT = 2.0  # beyond 2x, an upscaled clip is mostly interpolation
_SAME_ASPECT = math.log(1.05)  # aspect ratios within 5 % count as the same


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int
    weight: float | None = None

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width

    def upscale(self, width: int, height: int) -> float:
        """The scale that makes a `width x height` picture cover this bucket at its own aspect."""
        return max(self.height / height, self.width / width)


@dataclass(frozen=True)
class ClipSize:
    width: int
    height: int
    frames: int


class BucketTable:
    """The buckets of `data.buckets` (a list of mappings with `frames`, `height`, `width`,
    `batch_size` and optionally `weight`), checked: not empty, no shape twice, positive sizes,
    weights on every bucket or none, `1 <= max_upscale <= MAX_UPSCALE_LIMIT`. Every problem
    raises a ValueError that names the bucket and `data.buckets`."""

    def __init__(self, buckets: Sequence[Mapping[str, Any] | Bucket], max_upscale: float = 1.0,
                 stride: int = 1) -> None:
        if not buckets:
            raise ValueError("data.buckets is empty: give at least one {frames, height, width, batch_size}")
        if not 1.0 <= max_upscale <= MAX_UPSCALE_LIMIT:
            raise ValueError(f"data.max_upscale={max_upscale} is outside [1, {MAX_UPSCALE_LIMIT:g}]: "
                             f"clips are never downscaled to fit, and upscaling more than "
                             f"{MAX_UPSCALE_LIMIT:g}x makes pictures of interpolation")
        self.buckets = [_bucket(entry, index) for index, entry in enumerate(buckets)]
        seen: dict[tuple[int, int, int], int] = {}
        for index, bucket in enumerate(self.buckets):
            if bucket.shape in seen:
                raise ValueError(f"data.buckets[{index}] and data.buckets[{seen[bucket.shape]}] are the same "
                                 f"shape {bucket.name} (frames x height x width): buckets must not overlap")
            seen[bucket.shape] = index
        weighted = [b.weight is not None for b in self.buckets]
        if any(weighted) and not all(weighted):
            missing = [i for i, w in enumerate(weighted) if not w]
            raise ValueError(f"data.buckets{missing} have no weight while others do: give every bucket a "
                             f"weight, or none (shares then follow the clips)")
        self.max_upscale, self.stride = max_upscale, stride

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self):
        return iter(self.buckets)

    def assign(self, size: ClipSize) -> int | None:
        """Index of the bucket a clip of `size` goes to, or None when it fits none."""
        fitting = [i for i, b in enumerate(self.buckets)
                   if size.frames >= (b.frames - 1) * self.stride + 1
                   and b.upscale(size.width, size.height) <= self.max_upscale + 1e-9]
        if not fitting:
            return None
        aspect = math.log(size.width / size.height)
        distance = {i: abs(math.log(self.buckets[i].width / self.buckets[i].height) - aspect) for i in fitting}
        closest = min(distance.values())
        near = [i for i in fitting if distance[i] <= closest + _SAME_ASPECT]
        return max(near, key=lambda i: (math.prod(self.buckets[i].shape), -distance[i], -i))

    def batch_weights(self, clips_per_bucket: Sequence[int]) -> list[float]:
        """Each bucket's share of the batches: the table's weights, or `clips / batch_size`."""
        if self.buckets[0].weight is not None:
            raw = [b.weight for b in self.buckets]
        else:
            raw = [n / b.batch_size for n, b in zip(clips_per_bucket, self.buckets)]
        total = sum(raw)
        return [w / total for w in raw] if total > 0 else [0.0] * len(raw)

    def mean_batch_size(self, weights: Sequence[float]) -> float:
        """Clips per batch on average when batches come from the buckets at these shares."""
        return sum(w * b.batch_size for w, b in zip(weights, self.buckets))

    def describe(self) -> str:
        return ", ".join(b.name for b in self.buckets)


def _bucket(entry: Mapping[str, Any] | Bucket, index: int) -> Bucket:
    if isinstance(entry, Bucket):
        return entry
    where = f"data.buckets[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is {entry!r}: each bucket is a mapping with frames, height, width, batch_size")
    unknown = set(entry) - {"frames", "height", "width", "batch_size", "weight"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; a bucket has frames, height, width, "
                         f"batch_size and optionally weight")
    values: dict[str, Any] = {}
    for key in ("frames", "height", "width", "batch_size"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
        values[key] = value
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
        raise ValueError(f"{where}.weight must be a positive number, got {weight!r}")
    return Bucket(**values, weight=None if weight is None else float(weight))


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def size_from_meta(meta: Mapping[str, Any]) -> ClipSize | None:
    """Width, height and frame count from a sample's json (effvid's fields, or the video stream
    of video2dataset's `video_metadata`), or None when any is missing."""
    width, height = _positive_int(meta.get("width")), _positive_int(meta.get("height"))
    frames = _positive_int(meta.get("num_frames", meta.get("frames")))
    streams = (meta.get("video_metadata") or {}).get("streams") if isinstance(meta.get("video_metadata"), Mapping) else None
    for stream in streams or ():
        if isinstance(stream, Mapping) and stream.get("codec_type", "video") == "video":
            width = width or _positive_int(stream.get("width"))
            height = height or _positive_int(stream.get("height"))
            frames = frames or _positive_int(stream.get("nb_frames"))
            break
    if width and height and frames:
        return ClipSize(width, height, frames)
    return None


def clip_size(sample: Mapping[str, Any], media: str = "mp4") -> ClipSize | None:
    """A raw shard sample's size: its json, else its mp4 header (no frame decoded)."""
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    size = size_from_meta(meta) if isinstance(meta, Mapping) else None
    if size is None and media in sample:
        declared = declared_size(sample[media])
        if declared is not None and declared.frames:
            size = ClipSize(declared.width, declared.height, declared.frames)
    return size
