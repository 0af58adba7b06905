"""Clip planning (scenes -> spans within the duration bounds) and extraction (decode the spans,
resample to the target fps, resize to the target short side).

Spans are in decoded source frames, half-open `[start, end)`: a clip never contains a frame
of a neighbouring scene. Output frame k of a clip shows the last source frame whose time is
at or before `start_time + k / fps`, so variable-frame-rate sources come out at a constant rate.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from data_tools.curation_config import ClipsConfig
from data_tools.scenes import VideoScan


@dataclass(frozen=True)
class ClipSpan:
    start: int  # first source frame
    end: int  # one past the last source frame
    start_time: float  # seconds
    end_time: float  # seconds

    @property
    def seconds(self) -> float:
        return self.end_time - self.start_time


def _frame_time(scan: VideoScan, index: int) -> float:
    return float(scan.times[index]) if index < len(scan.times) else scan.end_time()


def plan_clips(scan: VideoScan, config: ClipsConfig) -> tuple[list[ClipSpan], list[str]]:
    """The clips to cut from `scan`'s scenes, and why the rest of the video was not used.

    A scene shorter than `min_seconds` is skipped; a longer one is split into consecutive
    clips of `max_seconds` (a remainder under `min_seconds` is skipped). `strategy` then keeps
    all clips, the first one, or the one from the longest scene.
    """
    clips: list[ClipSpan] = []
    scene_of: list[int] = []
    skipped: list[str] = []
    for scene_index, (start, end) in enumerate(scan.scenes()):
        scene_start, scene_end = _frame_time(scan, start), _frame_time(scan, end)
        if scene_end - scene_start < config.min_seconds:
            skipped.append(f"scene {start}-{end} is {scene_end - scene_start:.2f} s < min_seconds {config.min_seconds}")
            continue
        first = start
        while first < end:
            limit = _frame_time(scan, first) + config.max_seconds
            # One past the last frame that starts before the limit (times are ascending).
            last = int(np.searchsorted(scan.times, limit - 1e-9, side="left"))
            last = min(max(last, first + 1), end)
            span = ClipSpan(first, last, _frame_time(scan, first), _frame_time(scan, last))
            if span.seconds >= config.min_seconds - 1e-9:
                clips.append(span)
                scene_of.append(scene_index)
            else:
                skipped.append(f"remainder {first}-{last} of a scene is {span.seconds:.2f} s < min_seconds {config.min_seconds}")
            first = last
    if config.strategy == "first":
        clips = clips[:1]
    elif config.strategy == "longest" and clips:
        scenes = scan.scenes()
        longest = max(set(scene_of), key=lambda s: (scenes[s][1] - scenes[s][0], -s))
        clips = [clips[scene_of.index(longest)]]
    return clips, skipped


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the short side is `short_side` (never larger than the
    source), both even for H.264."""
    scale = 1.0 if short_side is None else min(1.0, short_side / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def sample_indices(scan: VideoScan, span: ClipSpan, fps: float | None) -> np.ndarray:
    """Source frame index of each output frame of `span`."""
    if fps is None:
        return np.arange(span.start, span.end)
    count = max(1, math.floor(span.seconds * fps + 1e-6))
    wanted = span.start_time + np.arange(count) / fps
    # The last source frame at or before each wanted time, kept inside the span.
    indices = np.searchsorted(scan.times, wanted + 1e-6, side="right") - 1
    return np.clip(indices, span.start, span.end - 1)


def extract_clips(
    path: str | Path, scan: VideoScan, spans: list[ClipSpan], config: ClipsConfig, data: bytes | None = None
) -> Iterator[np.ndarray]:
    """Decode `path` once and yield each span's frames `(F, H, W, 3)` uint8 RGB, in order,
    resampled to `config.fps` and resized to `config.short_side`."""
    width, height = output_size(scan.probe.width, scan.probe.height, config.short_side)
    wanted = [sample_indices(scan, span, config.fps) for span in spans]
    needed: dict[int, list[int]] = {}  # source frame -> the clips that show it
    for clip, indices in enumerate(wanted):
        for index in np.unique(indices):
            needed.setdefault(int(index), []).append(clip)
    pending: dict[int, dict[int, np.ndarray]] = {clip: {} for clip in range(len(spans))}
    next_clip = 0
    with av.open(str(path) if data is None else io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(container.decode(stream)):
            if next_clip >= len(spans):
                break
            for clip in needed.get(index, ()):  # spans are disjoint: at most one clip
                image = frame.to_ndarray(format="rgb24")  # (h, w, 3)
                if image.shape[:2] != (height, width):
                    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
                pending[clip][index] = image
            while next_clip < len(spans) and index >= spans[next_clip].end - 1:
                frames = pending.pop(next_clip)
                yield np.stack([frames[int(i)] for i in wanted[next_clip]])  # (F, H, W, 3)
                next_clip += 1
    if next_clip < len(spans):
        raise ValueError(f"the second decode ended before frame {spans[next_clip].end} (clip {next_clip})")
