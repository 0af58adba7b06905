"""The offline digit metric on clips rendered here from sklearn's digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lit_models.metrics import DIRECTIONS, DigitClassifier, parse_digit_caption, score_digit_videos

CANVAS, GLYPH, FRAMES = 32, 16, 8


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    classifier = DigitClassifier()
    assert classifier.fit() > 0.95  # held-out accuracy on the 8x8 digits
    return classifier


def render_clip(images: list[np.ndarray], direction: str, rng: np.random.Generator, speed: float = 1.0) -> np.ndarray:
    """A digit (2x upscaled) moving on a black canvas; frame f shows images[f * len // FRAMES].
    Returns `(F, H, W)` in [-1, 1]."""
    dy, dx = DIRECTIONS[direction]
    travel = speed * (FRAMES - 1)
    room = CANVAS - GLYPH
    y0 = rng.uniform(max(0.0, -dy * travel), room - max(0.0, dy * travel))
    x0 = rng.uniform(max(0.0, -dx * travel), room - max(0.0, dx * travel))
    clip = np.zeros((FRAMES, CANVAS, CANVAS), np.float32)
    for f in range(FRAMES):
        glyph = np.kron(images[f * len(images) // FRAMES], np.ones((2, 2))) / 16.0
        y, x = round(y0 + dy * speed * f), round(x0 + dx * speed * f)
        clip[f, y : y + GLYPH, x : x + GLYPH] = glyph
    return clip * 2 - 1


def digit_clips(count: int, seed: int = 0) -> tuple[torch.Tensor, list[int], list[str]]:
    rng = np.random.default_rng(seed)
    digits = load_digits()
    indices = rng.choice(len(digits.images), count, replace=False)
    directions = [list(DIRECTIONS)[i % 8] for i in range(count)]
    clips = [render_clip([digits.images[i]], d, rng) for i, d in zip(indices, directions)]
    return torch.from_numpy(np.stack(clips))[:, None], digits.target[indices].tolist(), directions


def test_rendered_digits_are_read_and_their_motion_found(classifier):
    videos, digits, directions = digit_clips(24)  # (24, 1, 8, 32, 32), every direction three times
    scores = score_digit_videos(videos, digits, directions, classifier=classifier)
    assert scores["digit_accuracy"] >= 0.9
    assert scores["direction_accuracy"] == 1.0
    assert scores["temporal_consistency"] >= 0.9

    # the quickstart trains on 16x16 frames, where the digit is 8x8
    small = F.interpolate(videos.flatten(1, 2), size=16, mode="area").view(24, 1, FRAMES, 16, 16)
    scores = score_digit_videos(small, digits, directions, classifier=classifier)
    assert scores["digit_accuracy"] >= 0.9
    assert scores["direction_accuracy"] == 1.0


def test_wrong_prompts_score_low(classifier):
    videos, digits, directions = digit_clips(16, seed=1)
    wrong_digits = [(d + 1) % 10 for d in digits]
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}
    wrong_directions = ["-".join(opposite[p] for p in d.split("-")) for d in directions]
    scores = score_digit_videos(videos, wrong_digits, wrong_directions, classifier=classifier)
    assert scores["digit_accuracy"] < 0.2
    assert scores["direction_accuracy"] == 0.0


def test_noise_is_near_chance(classifier):
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(40, 1, FRAMES, 16, 16, generator=generator) * 2 - 1
    scores = score_digit_videos(videos, [i % 10 for i in range(40)], classifier=classifier)
    assert scores["digit_accuracy"] < 0.35
    assert "direction_accuracy" not in scores


def test_a_digit_that_changes_half_way_is_half_consistent(classifier):
    digits = load_digits()
    zero, six = digits.images[digits.target == 0][0], digits.images[digits.target == 6][0]
    rng = np.random.default_rng(0)
    videos = torch.from_numpy(np.stack([render_clip([zero, six], "right", rng), render_clip([six, zero], "up", rng)]))
    scores = score_digit_videos(videos[:, None], [0, 6], ["right", "up"], classifier=classifier)
    assert scores["temporal_consistency"] == pytest.approx(0.5, abs=0.125)
    assert scores["digit_accuracy"] == pytest.approx(0.5, abs=0.125)


def test_a_still_digit_has_no_direction(classifier):
    videos, digits, _ = digit_clips(2)
    still = videos[:, :, :1].expand(-1, -1, FRAMES, -1, -1)
    scores = score_digit_videos(still, digits, ["up", "left"], classifier=classifier)
    assert scores["direction_accuracy"] == 0.0
    assert scores["digit_accuracy"] == 1.0


def test_classifier_is_cached_per_sklearn_version(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFVID_CACHE", str(tmp_path))
    first = DigitClassifier.load()
    cached = list(tmp_path.glob("digit_classifier_sklearn-*.joblib"))
    assert len(cached) == 1 and first.held_out_accuracy > 0.95
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    second = DigitClassifier.load()
    assert second.held_out_accuracy == first.held_out_accuracy
    images = load_digits().images[:50]
    assert (second.predict(images) == first.predict(images)).all()


def test_bad_input_is_rejected_with_a_clear_message(classifier):
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        score_digit_videos(torch.zeros(2, 8, 16, 16), [1, 2], classifier=classifier)
    with pytest.raises(ValueError, match="unknown directions"):
        score_digit_videos(torch.zeros(1, 1, 2, 16, 16), [1], ["sideways"], classifier=classifier)


@pytest.mark.parametrize(
    "caption, parsed",
    [
        ("a handwritten 7 moving up-left", (7, "up-left")),
        ("a handwritten 0 moving down", (0, "down")),
        ("a handwritten 3 moving down-right", (3, "down-right")),
        ("a handwritten 7", None),
        ("a handwritten 12 moving up", None),
        ("a handwritten 7 moving sideways", None),
        ("", None),
    ],
)
def test_parse_digit_caption(caption, parsed):
    assert parse_digit_caption(caption) == parsed
