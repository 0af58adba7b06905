"""Offline metric for generated moving-digit videos: is it the prompted digit, does it stay
the same digit, and does it move the prompted way?

A classifier fit on scikit-learn's bundled 8x8 digits reads each frame: the brightest
window of `digit_fraction * H` pixels is cropped, area-resized to 8x8 and rescaled to the
0..16 range of the training data.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

# Unit (dy, dx) per direction; y grows downwards, so "up" is dy = -1.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "up": (-1.0, 0.0),
    "down": (1.0, 0.0),
    "left": (0.0, -1.0),
    "right": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-left": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
_CAPTION = re.compile(r"^\s*a handwritten (\d) moving (" + "|".join(sorted(DIRECTIONS, key=len, reverse=True)) + r")\s*$")
_SOURCE_MAX = 16.0  # load_digits intensities are 0..16


def parse_digit_caption(caption: str) -> tuple[int, str] | None:
    """`"a handwritten 7 moving up-left"` -> `(7, "up-left")`; None for any other caption."""
    match = _CAPTION.match(caption)
    return (int(match.group(1)), match.group(2)) if match else None


def cache_dir() -> Path:
    return Path(os.environ.get("EFFVID_CACHE", Path.home() / ".cache" / "effvid"))


def _training_crops(images: np.ndarray) -> np.ndarray:
    """sklearn's 8x8 digits `(N, 8, 8)` passed through the same `locate_digits` as video
    frames: `(5 N, 8, 8)`.

    The digit is upscaled 2x (as the videos do) onto a canvas and cropped at full
    resolution, and at half resolution from the four sub-pixel offsets, which is where the
    quickstart's 16x16 frames leave it.
    """
    upscaled = torch.from_numpy(images).float().repeat_interleave(2, 1).repeat_interleave(2, 2) / _SOURCE_MAX
    upscaled = upscaled[:, None]  # (N, 1, 16, 16)
    crops = [locate_digits(F.pad(upscaled, (4, 4, 4, 4))[:, 0], 16 / 24)[0]]
    for dy in (0, 1):
        for dx in (0, 1):
            shifted = F.pad(upscaled, (4 + dx, 4 - dx, 4 + dy, 4 - dy))  # (N, 1, 24, 24)
            crops.append(locate_digits(F.avg_pool2d(shifted, 2)[:, 0], 8 / 12)[0])
    return torch.cat(crops).numpy()


class DigitClassifier:
    """An RBF SVM on sklearn's 8x8 digits, cropped the way video frames are.

    `DigitClassifier.load()` fits once and caches with joblib under `$EFFVID_CACHE` (default
    `~/.cache/effvid/`), keyed by the scikit-learn version.
    """

    def __init__(self) -> None:
        self.model = None
        self.held_out_accuracy: float | None = None

    def fit(self, seed: int = 0) -> float:
        """Fit on 80% of the digits; returns (and stores) the accuracy on the other 20%."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        digits = load_digits()
        train_x, test_x, train_y, test_y = train_test_split(
            digits.images.astype(np.float32), digits.target, test_size=0.2, random_state=seed, stratify=digits.target
        )
        self.model = SVC(C=10.0, gamma="scale")
        self.model.fit(_training_crops(train_x).reshape(-1, 64) / _SOURCE_MAX, np.tile(train_y, 5))
        test_crops = _training_crops(test_x)[: len(test_x)]  # the full-resolution crops
        self.held_out_accuracy = float(self.model.score(test_crops.reshape(-1, 64) / _SOURCE_MAX, test_y))
        return self.held_out_accuracy

    @classmethod
    def load(cls) -> DigitClassifier:
        """The cached classifier, fit (a few seconds) and cached on first use."""
        import joblib
        import sklearn

        path = cache_dir() / f"digit_classifier_sklearn-{sklearn.__version__}.joblib"
        if path.exists():
            return joblib.load(path)
        classifier = cls()
        classifier.fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        joblib.dump(classifier, temporary)
        temporary.replace(path)  # atomic: a concurrent reader never sees half a file
        return classifier

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Digit labels `(N,)` for 8x8 images `(N, 8, 8)` in the 0..16 range."""
        if self.model is None:
            raise RuntimeError("DigitClassifier: call fit() or use DigitClassifier.load()")
        return self.model.predict(images.reshape(len(images), 64) / _SOURCE_MAX)


def _crop(frames: Tensor, top: Tensor, left: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Windows `(N, size, size)` at (top, left) and their intensity centre of mass (row, col)."""
    rows = top[:, None] + torch.arange(size)  # (N, size)
    cols = left[:, None] + torch.arange(size)
    crops = frames[torch.arange(len(frames))[:, None, None], rows[:, :, None], cols[:, None, :]]
    mass = crops.sum(dim=(1, 2)).clamp_min(1e-8)
    center_row = (crops.sum(dim=2) * rows).sum(dim=1) / mass
    center_col = (crops.sum(dim=1) * cols).sum(dim=1) / mass
    return crops, center_row, center_col


def locate_digits(frames: Tensor, digit_fraction: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Crop the brightest square window of each frame.

    Args:
        frames: `(N, H, W)` intensities >= 0.
    Returns:
        crops `(N, 8, 8)` rescaled to 0..16, and the window's intensity centre of mass
        `(N,)` row and `(N,)` column in frame coordinates.
    """
    height, width = frames.shape[-2:]
    size = max(1, round(digit_fraction * min(height, width)))
    window_sums = F.avg_pool2d(frames[:, None], size, stride=1)[:, 0]  # (N, H-size+1, W-size+1)
    best = window_sums.flatten(1).argmax(dim=1)
    top, left = best // window_sums.shape[-1], best % window_sums.shape[-1]
    crops, center_row, center_col = _crop(frames, top, left, size)
    # Windows tie when the digit has blank margins; centring the window on the digit's centre
    # of mass makes the crop position well defined (and the same as in training).
    top = (center_row - (size - 1) / 2).round().long().clamp(0, height - size)
    left = (center_col - (size - 1) / 2).round().long().clamp(0, width - size)
    crops, center_row, center_col = _crop(frames, top, left, size)

    crops = F.adaptive_avg_pool2d(crops[:, None], 8)[:, 0]  # area resize, (N, 8, 8)
    peak = crops.flatten(1).amax(dim=1).clamp_min(1e-8)
    crops = crops / peak[:, None, None] * _SOURCE_MAX  # generated digits may be dim
    return crops, center_row, center_col


def nearest_direction(d_row: float, d_col: float, min_displacement: float = 0.5) -> str | None:
    """The one of the 8 `DIRECTIONS` closest in angle to a displacement (rows grow down);
    None when it moved less than `min_displacement` pixels."""
    if math.hypot(d_row, d_col) < min_displacement:
        return None
    return max(DIRECTIONS, key=lambda name: DIRECTIONS[name][0] * d_row + DIRECTIONS[name][1] * d_col)


@torch.no_grad()
def score_digit_videos(
    videos: Tensor,
    digits: Sequence[int],
    directions: Sequence[str] | None = None,
    digit_fraction: float = 0.5,
    classifier: DigitClassifier | None = None,
    video_fd: bool = True,
) -> dict[str, float]:
    """Digit metric for videos `(B, C, F, H, W)` in [-1, 1] prompted with `digits` (and
    `directions`).

    Returns `digit_accuracy` (fraction of frames read as the prompted digit),
    `temporal_consistency` (fraction of frames agreeing with their clip's majority reading)
    and, with directions, `direction_accuracy` (fraction of clips whose centre of mass moves
    first -> last frame in the prompted direction, nearest of 8) and, for two or more 8-frame
    clips and `video_fd`, `video_fd`: the Frechet distance of a spatio-temporal classifier's
    features to real held-out clips with the same captions (`lit_models.video_classifier`).
    """
    if videos.ndim != 5:
        raise ValueError(f"score_digit_videos: videos must be (B, C, F, H, W), got shape {tuple(videos.shape)}")
    batch_size, _, num_frames, _, _ = videos.shape
    if len(digits) != batch_size or (directions is not None and len(directions) != batch_size):
        raise ValueError(f"score_digit_videos: {batch_size} videos but {len(digits)} digits / directions")
    if directions is not None and (unknown := set(directions) - set(DIRECTIONS)):
        raise ValueError(f"score_digit_videos: unknown directions {sorted(unknown)}; expected {list(DIRECTIONS)}")
    classifier = classifier or DigitClassifier.load()

    intensity = (videos.detach().float().cpu().mean(dim=1).clamp(-1, 1) + 1) / 2  # (B, F, H, W) in [0, 1]
    crops, center_row, center_col = locate_digits(rearrange(intensity, "b f h w -> (b f) h w"), digit_fraction)
    predicted = torch.from_numpy(classifier.predict(crops.numpy())).view(batch_size, num_frames)  # (B, F)

    prompted = torch.as_tensor(list(digits)).view(batch_size, 1)
    majority = predicted.mode(dim=1).values.view(batch_size, 1)
    scores = {
        "digit_accuracy": (predicted == prompted).float().mean().item(),
        "temporal_consistency": (predicted == majority).float().mean().item(),
    }
    if directions is not None:
        center_row = center_row.view(batch_size, num_frames)
        center_col = center_col.view(batch_size, num_frames)
        moved = [
            nearest_direction(float(center_row[i, -1] - center_row[i, 0]), float(center_col[i, -1] - center_col[i, 0]))
            for i in range(batch_size)
        ]
        scores["direction_accuracy"] = float(np.mean([m == d for m, d in zip(moved, directions)]))
        from lit_models.video_classifier import NUM_FRAMES, digit_video_fd  # it imports this module

        if video_fd and batch_size >= 2 and num_frames == NUM_FRAMES:
            scores["video_fd"] = digit_video_fd(videos, digits, directions)
    return scores
