"""Text-to-video with masked-frame conditioning: one model for generation, image-to-video,
video prediction, long-video extension (LVDM) and frame interpolation.

The diffusion module with the `KnownFrames` input (`lit_models/inputs.py`), plus the sampling
procedures built on it: extension and interpolation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lit_models.conditioning import FRAME_MASK_MODES
from lit_models.diffusion import DiffusionModule
from lit_models.inputs import KnownFrames


class FrameConditionedTextToVideo(DiffusionModule):
    """A text-to-video model whose net (built with `in_channels = 2 * channels + 1`) also sees
    known frames: `KnownFrames`' `mask_modes`, then `DiffusionModule`'s arguments."""

    def __init__(self, net: nn.Module, mask_modes: Sequence[str] = FRAME_MASK_MODES, **diffusion: Any) -> None:
        super().__init__(net=net, inputs=KnownFrames(mask_modes), **diffusion)

    def generate_with_frames(self, prompts: Sequence[str], known: Tensor, known_mask: Tensor, sampler: str | None = None,
                             steps: int | None = None, guidance_scale: float | None = None, seed: int = 0) -> Tensor:  # fmt: skip
        """Videos shaped like `known` `(B, C, F, H, W)`, its frames where `known_mask` `(B, F)`
        is True given (and copied into the result)."""
        return self.generate(prompts, sampler, steps, guidance_scale, seed, known=known, known_mask=known_mask)

    @torch.no_grad()
    def extend(self, prompts: Sequence[str], videos: Tensor, num_new: int, context: int | None = None, **sampling: Any) -> Tensor:
        """Autoregressive extension (LVDM): append `num_new` frames to `videos` `(B, C, F, H, W)`,
        each window conditioned on the last `context` frames (default half the window)."""
        window = self.video_shape[1]
        context = context or window // 2
        if not 0 < context < window:
            raise ValueError(f"extend: context must be in 1..{window - 1} frames, got {context}")
        seed = sampling.pop("seed", 0)
        while num_new > 0:
            new = min(window - context, num_new)
            known = torch.zeros(*videos.shape[:2], context + new, *videos.shape[3:], device=videos.device)
            known[:, :, :context] = videos[:, :, -context:]
            mask = torch.zeros(videos.shape[0], context + new, dtype=torch.bool)
            mask[:, :context] = True
            out = self.generate_with_frames(prompts, known, mask, seed=seed, **sampling)
            videos = torch.cat([videos, out[:, :, context:]], dim=2)
            num_new, seed = num_new - new, seed + 1
        return videos

    @torch.no_grad()
    def interpolate(self, prompts: Sequence[str], videos: Tensor, **sampling: Any) -> Tensor:
        """Double the frame rate: `(B, C, F, H, W)` -> `(B, C, 2F - 1, H, W)`, the given frames at
        even positions, the ones between generated in windows of the training clip length."""
        batch_size, channels, num_frames, height, width = videos.shape
        window = min(self.video_shape[1], 2 * num_frames - 1)
        length = 2 * num_frames - 1
        out = torch.zeros(batch_size, channels, length, height, width, device=videos.device)
        out[:, :, ::2] = videos
        given = torch.zeros(length, dtype=torch.bool)
        given[::2] = True
        filled = given.clone()
        starts = list(range(0, length - window + 1, max(window - 2, 1)))
        if starts[-1] != length - window:
            starts.append(length - window)
        seed = sampling.pop("seed", 0)
        for index, start in enumerate(starts):
            span = slice(start, start + window)
            mask = given[span].expand(batch_size, window)
            generated = self.generate_with_frames(prompts, out[:, :, span], mask, seed=seed + index, **sampling)
            todo = ~filled[span]
            out[:, :, start:start + window][:, :, todo] = generated[:, :, todo]
            filled[span] = True
        return out
