"""The embedded default's metrics on sampled videos, outside the generic model: the digit metric
(`metrics.score_digit_videos`) and the digit reward (`rewards.digit_reward`), for prompts that
are moving-digit captions ("a handwritten 3 moving up") or still-image ones ("a handwritten 3").

`DigitMetrics` is the validation callback that logs them for whatever a module sampled at
validation (`ValidationSamples.validation_samples`); effvid-sample calls `digit_scores` itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import Tensor

from lit_models.metrics import parse_digit_caption, score_digit_videos

_IMAGE_CAPTION = re.compile(r"^a handwritten (\d)$")
CLASSIFIER_SIZE = 16  # the digit classifier reads 16 px frames (the digits' base resolution)


def digit_scores(prompts: Sequence[str], videos: Tensor, reward: bool = True) -> dict[str, float]:
    """Digit metric (and mean digit reward) of videos `(B, C, F, H, W)` sampled from moving-digit
    prompts; the metric without direction for still-image captions (Make-A-Video's video stage
    learns motion from uncaptioned clips); nothing for other prompts. Videos larger than the
    classifier's 16 px (a super-resolution stage) are scored resized to it."""
    from lit_models.super_resolution import resize_frames  # lit_models.super_resolution imports the core

    if videos.shape[-1] > CLASSIFIER_SIZE:
        videos = resize_frames(videos, (CLASSIFIER_SIZE, CLASSIFIER_SIZE))
    parsed = [parse_digit_caption(p) for p in prompts]
    if parsed and all(p is not None for p in parsed):
        digits, directions = zip(*parsed)
        scores = score_digit_videos(videos, list(digits), list(directions))
        if reward:
            from lit_models.rewards import digit_reward

            scores["reward"] = float(digit_reward(videos, list(prompts)).mean())
        return scores
    stills = [_IMAGE_CAPTION.match(p) for p in prompts]
    if stills and all(stills):
        return score_digit_videos(videos, [int(m.group(1)) for m in stills])
    return {}


class DigitMetrics(L.Callback):
    """Logs `val/digit_accuracy`, `val/direction_accuracy`, ... (and `val/reward`) for the videos
    a module sampled at this validation, when its prompts are digit captions.

    Args:
        reward: also log the mean digit reward (the score preference pairs are ranked by).
    """

    def __init__(self, reward: bool = True) -> None:
        self.reward = reward

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        samples = getattr(pl_module, "validation_samples", None)
        if samples is None or trainer.sanity_checking:
            return
        prompts, videos = samples
        for name, value in digit_scores(prompts, videos, self.reward).items():
            pl_module.log(f"val/{name}", value)
