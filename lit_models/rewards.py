"""Per-video rewards for preference data and evaluation.

`digit_reward` is the embedded default's reward: (fraction of frames the digit classifier
reads as the prompted digit) x (motion-direction correctness). The classifier is the SVM of
`metrics.py`, which gives labels, not probabilities, so the per-frame agreement rate stands
in for "the probability of the prompted digit". Direction correctness is graded rather than
0/1, so samples that move roughly the right way rank above ones that do not: the cosine
between the clip's first-to-last centre-of-mass displacement and the prompted direction,
clipped at 0, and 0 when the digit moved less than half a pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from lit_models.metrics import DIRECTIONS, DigitClassifier, locate_digits, parse_digit_caption


@torch.no_grad()
def digit_reward(
    videos: Tensor,
    prompts: Sequence[str],
    digit_fraction: float = 0.5,
    min_displacement: float = 0.5,
    classifier: DigitClassifier | None = None,
) -> Tensor:
    """Rewards `(B,)` in [0, 1] for videos `(B, C, F, H, W)` in [-1, 1] and their digit prompts."""
    parsed = [parse_digit_caption(p) for p in prompts]
    bad = [p for p, q in zip(prompts, parsed) if q is None]
    if bad:
        raise ValueError(f"digit_reward: not a moving-digit caption: {bad[0]!r} ('a handwritten 7 moving up-left')")
    if videos.ndim != 5 or videos.shape[0] != len(prompts):
        raise ValueError(f"digit_reward: videos {tuple(videos.shape)} do not match {len(prompts)} prompts")
    classifier = classifier or DigitClassifier.load()
    batch_size, _, num_frames = videos.shape[:3]
    intensity = (videos.detach().float().cpu().mean(dim=1).clamp(-1, 1) + 1) / 2  # (B, F, H, W)
    crops, row, col = locate_digits(rearrange(intensity, "b f h w -> (b f) h w"), digit_fraction)
    predicted = torch.from_numpy(classifier.predict(crops.numpy())).view(batch_size, num_frames)
    digits = torch.tensor([d for d, _ in parsed]).view(batch_size, 1)
    digit_score = (predicted == digits).float().mean(dim=1)  # (B,)

    row, col = row.view(batch_size, num_frames), col.view(batch_size, num_frames)
    d_row, d_col = row[:, -1] - row[:, 0], col[:, -1] - col[:, 0]
    direction_score = torch.zeros(batch_size)
    for i, (_, direction) in enumerate(parsed):
        length = math.hypot(float(d_row[i]), float(d_col[i]))
        if length >= min_displacement:
            u_row, u_col = DIRECTIONS[direction]
            direction_score[i] = max(0.0, (u_row * float(d_row[i]) + u_col * float(d_col[i])) / length)
    return digit_score * direction_score


REWARDS = {"digits": digit_reward}
