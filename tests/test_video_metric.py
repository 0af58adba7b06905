"""The video-level metric: real held-out clips are near the reference, clips with their frames
shuffled (every frame real, the motion gone) are far from it, and it is reported beside the
per-frame digit metric."""

from __future__ import annotations

import pytest
import torch

from lit_models.metrics import DIRECTIONS, score_digit_videos
from lit_models.video_classifier import DigitVideoClassifier, digit_video_fd, real_digit_clips, to_classifier_input

PROMPTS = [(i % 10, list(DIRECTIONS)[i % 8]) for i in range(40)]


@pytest.fixture(scope="module")
def classifier() -> DigitVideoClassifier:
    return DigitVideoClassifier.load()  # the tiny one conftest put in the test cache


def held_out(seed: int) -> torch.Tensor:
    digits, directions = zip(*PROMPTS)
    return real_digit_clips(digits, directions, seed=seed)  # (40, 1, 8, 16, 16)


def test_real_clips_score_near_zero_and_shuffled_frames_far(classifier):
    digits, directions = zip(*PROMPTS)
    reference = real_digit_clips([d for d in digits for _ in range(4)], [d for d in directions for _ in range(4)], seed=0)
    real = held_out(seed=1)  # other clips, same captions
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.stack([clip[:, torch.randperm(8, generator=generator)] for clip in real])

    fd_real = digit_video_fd(real, digits, directions, classifier=classifier, real=reference)
    fd_shuffled = digit_video_fd(shuffled, digits, directions, classifier=classifier, real=reference)
    assert fd_real < 0.25 * fd_shuffled


def test_real_clips_are_clips_the_datamodule_would_give():
    clips = held_out(seed=2)
    assert clips.shape == (40, 1, 8, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    # The digit moves the captioned way: compare where the mass is in the first and last frame.
    intensity = (clips[:, 0] + 1) / 2
    rows, cols = torch.arange(16.0).view(1, 1, 16, 1), torch.arange(16.0).view(1, 1, 1, 16)
    mass = intensity.sum(dim=(2, 3))
    center = torch.stack([(intensity * rows).sum(dim=(2, 3)) / mass, (intensity * cols).sum(dim=(2, 3)) / mass], -1)
    moved = center[:, -1] - center[:, 0]  # (B, 2)
    expected = torch.tensor([DIRECTIONS[d] for _, d in PROMPTS])
    assert ((moved * expected).sum(dim=1) > 1.0).all()


def test_score_reports_video_fd_for_clips_of_eight_frames(classifier):
    digits, directions = zip(*PROMPTS[:6])
    videos = held_out(seed=3)[:6]
    assert "video_fd" in score_digit_videos(videos, list(digits), list(directions))
    assert "video_fd" not in score_digit_videos(videos, list(digits), list(directions), video_fd=False)
    assert "video_fd" not in score_digit_videos(videos[:, :, :4], list(digits), list(directions))  # not 8 frames
    with pytest.raises(ValueError, match="reads"):
        to_classifier_input(videos[:, :, :4])
