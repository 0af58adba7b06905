"""Image-to-video on a frozen text-to-video model, as I2V-Adapter (Guo et al. 2024) trains and
samples it: the first frame is given clean (un-noised in the network's input, out of the loss,
kept as given while sampling; the core's clean frames, `lit_models/diffusion.py`), the
`I2VAdapter` injector's first-frame attention branch is what trains, and sampling starts from a
frame-similarity noise prior built from the given image.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lit_models.diffusion import CLEAN_FRAMES, CLEAN_MASK, Conditioning
from lit_models.peft import ParameterEfficientFineTuning


def first_frame_mask(batch_size: int, num_frames: int, device: torch.device | None = None) -> Tensor:
    """`(B, F)` bool, True at frame 0."""
    mask = torch.zeros(batch_size, num_frames, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


class ImageToVideoFineTuning(ParameterEfficientFineTuning):
    """`ParameterEfficientFineTuning` with the first frame of every clip given clean.

    Args:
        prior_strength: gamma of the frame-similarity prior (`frame_similarity_noise`); 0 starts
            sampling from plain noise.
        prior_noise_level: where the given frame enters the prior, tau as a fraction of the
            schedule's training timesteps (0.7: t = 0.7 T).
        **peft: `ParameterEfficientFineTuning` arguments (`trainable: [I2VAdapter]`).
    """

    def __init__(self, prior_strength: float = 0.0, prior_noise_level: float = 0.7, **peft: Any) -> None:
        super().__init__(**peft)
        for name, value in (("prior_strength", prior_strength), ("prior_noise_level", prior_noise_level)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.prior_strength, self.prior_noise_level = prior_strength, prior_noise_level

    def condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        conditioning = super().condition(batch, drop)
        x0 = self.clean_data(batch)  # (B, C, F, H, W)
        return {**conditioning, CLEAN_FRAMES: x0, CLEAN_MASK: first_frame_mask(x0.shape[0], x0.shape[2], x0.device)}

    def frame_similarity_noise(
        self, first: Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """I2V-Adapter's frame-similarity prior (our reading of it): every frame's starting noise
        is `sqrt(gamma) * z1_tau + sqrt(1 - gamma) * eps`, z1_tau the given first frame `first`
        `(B, C, 1, H, W)` noised to `prior_noise_level` (one draw shared by the frames), eps the
        plain per-frame noise. gamma = 0 is exactly the plain draw for the same generator."""
        noise = self.draw_noise(tuple(shape), generator)  # (B, C, F, H, W)
        if self.prior_strength == 0.0:
            return noise
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        tau = round(self.prior_noise_level * (num_train_timesteps - 1))
        timesteps = torch.full((shape[0],), tau, dtype=torch.float32 if self.flow_matching else torch.long)
        noised_first = self.noisy_and_target(first.cpu().float(), torch.randn(first.shape, generator=generator), timesteps)[0]
        gamma = self.prior_strength
        return gamma**0.5 * noised_first + (1.0 - gamma) ** 0.5 * noise

    @torch.no_grad()
    def generate_from_image(
        self, prompts: Sequence[str], images: Tensor, seed: int = 0, num_frames: int | None = None, **sampling: Any
    ) -> Tensor:
        """Videos `(B, C, F, H, W)` whose first frame is `images` `(B, C, H, W)` in [-1, 1];
        `sampling`: `sample`'s sampler, steps, guidance_scale."""
        channels, frames, height, width = self.video_shape
        shape = self.data_shape((len(prompts), channels, num_frames or frames, height, width))
        first = self.encode_data(images.to(self.device)[:, :, None])  # (B, C', 1, h, w)
        given = {CLEAN_FRAMES: first.expand(shape), CLEAN_MASK: first_frame_mask(shape[0], shape[2], self.device)}
        conditioning = {**self.encode_captions(prompts), **given}
        unconditioning = {**self.encode_captions([""] * len(prompts)), **given}
        generator = torch.Generator().manual_seed(seed)
        noise = self.frame_similarity_noise(first, shape, generator)
        videos = self.sample(shape, conditioning, unconditioning, generator=generator, initial_noise=noise, **sampling)
        return self.decode_data(videos)
