"""Per-clip scores with OpenCV (motion, sharpness, brightness, perceptual hash) and the bound
checks that turn a score into a drop reason.

Scores are computed on the re-encoded clip's frames (output fps and size), so they describe
what training will see; all of them go into the sample json whether or not a bound is set.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_tools.curation_config import BoundsConfig, FiltersConfig


def keyframe_indices(num_frames: int) -> list[int]:
    """Frames at 1/4, 1/2 and 3/4 of the clip (repeated when the clip is very short, so
    every clip has three keyframe hashes to compare)."""
    return [min(num_frames - 1, num_frames * q // 4) for q in (1, 2, 3)]


def _gray(frame: np.ndarray, width: int | None = None) -> np.ndarray:
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)  # (H, W)
    if width is not None and gray.shape[1] > width:
        height = max(2, round(gray.shape[0] * width / gray.shape[1]))
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    return gray


def motion_score(frames: np.ndarray, width: int = 128, pairs: int = 8) -> float:
    """Mean Farneback optical-flow magnitude between consecutive frames `(F, H, W, 3)`, in % of
    the frame width per frame, averaged over up to `pairs` evenly spaced frame pairs."""
    if len(frames) < 2:
        return 0.0
    starts = np.unique(np.linspace(0, len(frames) - 2, num=min(pairs, len(frames) - 1)).round().astype(int))
    magnitudes = []
    for i in starts:
        a, b = _gray(frames[i], width), _gray(frames[i + 1], width)
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (h, w, 2)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()) / a.shape[1] * 100.0)
    return float(np.mean(magnitudes))


def sharpness_score(keyframes: list[np.ndarray]) -> float:
    """Mean variance of the Laplacian of the grayscale keyframes (low means blurred)."""
    return float(np.mean([cv2.Laplacian(_gray(f), cv2.CV_64F).var() for f in keyframes]))


def brightness_score(keyframes: list[np.ndarray]) -> float:
    """Mean luma of the keyframes, 0..255."""
    return float(np.mean([_gray(f).mean() for f in keyframes]))


def perceptual_hash(frame: np.ndarray) -> int:
    """64-bit pHash: signs of the low 8x8 DCT coefficients of the 32x32 grayscale frame
    against their median (robust to re-encoding, resizing and small brightness changes)."""
    small = cv2.resize(_gray(frame), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return int(np.packbits(bits).view(">u8")[0])


def opencv_scores(frames: np.ndarray, config: FiltersConfig) -> dict[str, float | list[str]]:
    """The OpenCV scores of one clip `(F, H, W, 3)` for its sample json."""
    keyframes = [frames[i] for i in keyframe_indices(len(frames))]
    return {
        "motion": round(motion_score(frames, config.motion_width, config.motion_pairs), 4),
        "sharpness": round(sharpness_score(keyframes), 2),
        "brightness": round(brightness_score(keyframes), 2),
        "phash": [f"{perceptual_hash(f):016x}" for f in keyframes],
    }


def bounds_violation(name: str, value: float | None, bounds: BoundsConfig) -> str | None:
    """A drop reason "name: value < min" / "name: value > max", or None when within bounds."""
    if value is None:
        return None
    if bounds.min is not None and value < bounds.min:
        return f"{name}: {value:.4g} < min {bounds.min}"
    if bounds.max is not None and value > bounds.max:
        return f"{name}: {value:.4g} > max {bounds.max}"
    return None
