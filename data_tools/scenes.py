"""Probe + cut detection in one decoding pass: PySceneDetect detectors fed downscaled frames.

The detectors are driven frame by frame (`process_frame` / `post_process`) from the probe's
PyAV decode instead of through `scenedetect.detect`, so each input is decoded once for both
and the frame numbers are the decoder's own (exact, also for variable frame rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from data_tools.curation_config import CutsConfig
from data_tools.probe import VideoProbe, probe_video

if TYPE_CHECKING:
    from scenedetect import SceneDetector


# Timecodes are built from decoded frame numbers; the detectors only compare them (and
# `min_scene_len` is given in frames), so any fixed rate keeps them exact.
_NOMINAL_FPS = 30.0


@dataclass(frozen=True)
class VideoScan:
    probe: VideoProbe
    times: np.ndarray  # (N,) presentation time of each decoded frame, seconds from the first
    cuts: tuple[int, ...]  # frame indices that start a new scene (0 excluded), ascending

    def scenes(self) -> list[tuple[int, int]]:
        """Scenes as half-open frame ranges `[start, end)` covering the whole video."""
        bounds = [0, *self.cuts, self.probe.num_frames]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def end_time(self) -> float:
        """The time just after the last frame (its start plus one nominal frame)."""
        step = 1.0 / self.probe.fps if self.probe.fps > 0 else 0.0
        return float(self.times[-1]) + step


def _make_detector(config: CutsConfig) -> SceneDetector | None:
    if config.detector == "none":
        return None
    from scenedetect import AdaptiveDetector, ContentDetector

    if config.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=config.adaptive_threshold, min_scene_len=config.min_scene_frames)
    return ContentDetector(threshold=config.threshold, min_scene_len=config.min_scene_frames)


def _detection_size(width: int, height: int, target_width: int) -> tuple[int, int]:
    if width <= target_width:
        return width, height
    return target_width, max(2, round(height * target_width / width))


def scan_video(path: str | Path, config: CutsConfig, data: bytes | None = None) -> VideoScan:
    """Probe the video at `path` and find its cuts; raises `VideoProbeError` like the probe."""
    from scenedetect import FrameTimecode

    detector = _make_detector(config)
    times: list[float] = []
    cuts: list[int] = []

    def on_frame(frame: av.VideoFrame) -> None:
        index = len(times)
        times.append(float(frame.time) if frame.time is not None else math.nan)
        if detector is None:
            return
        width, height = _detection_size(frame.width, frame.height, config.width)
        image = frame.reformat(width=width, height=height, format="bgr24").to_ndarray()  # (h, w, 3) BGR
        cuts.extend(t.frame_num for t in detector.process_frame(FrameTimecode(index, _NOMINAL_FPS), image))

    probe = probe_video(path, data, on_frame=on_frame)
    if detector is not None:
        cuts.extend(t.frame_num for t in detector.post_process(FrameTimecode(len(times) - 1, _NOMINAL_FPS)))
    clean_times = np.asarray(times, dtype=np.float64)
    if np.isnan(clean_times).any() or (np.diff(clean_times) < 0).any():
        # No or unordered timestamps: fall back to the nominal rate.
        clean_times = np.arange(len(times)) / (probe.fps or 30.0)
    clean_times = clean_times - clean_times[0]
    valid = sorted({c for c in cuts if 0 < c < probe.num_frames})
    return VideoScan(probe, clean_times, tuple(valid))
