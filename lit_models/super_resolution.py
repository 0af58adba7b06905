"""Spatial super-resolution, the cascade's upsampling stage (Imagen Video, Make-A-Video's SR
models, Video LDM's upscaler): a text-to-video model conditioned on a low-resolution clip.

The low-resolution clip is upsampled to the output size and concatenated to the noisy input
(`LowResConditioning`). Noise-conditioning augmentation (Ho et al. 2021, Cascaded Diffusion):
at training the low-res clip is noised to a random level of the diffusion's own schedule and
the net is told the level; at sampling a fixed small level is used, so the stage is robust
to the artefacts of the stage below it rather than expecting perfect downsampled videos.
Temporal super-resolution is frame interpolation with a masked-frame model
(`FrameConditionedTextToVideo.interpolate`); `effvid-sample pipeline=cascade` chains them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lit_models.diffusion import DiffusionModule
from lit_models.forward_process import Conditioning
from lit_models.inputs import SamplingRequest, TextOnly


def resize_frames(videos: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize every frame of `(B, C, F, H, W)` videos to `size` (antialiased bilinear)."""
    if tuple(videos.shape[-2:]) == tuple(size):
        return videos
    frames = videos.shape[2]
    flat = rearrange(videos, "b c f h w -> (b f) c h w")
    flat = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rearrange(flat, "(b f) c h w -> b c f h w", f=frames)


def _level_features(levels: Tensor, width: int) -> Tensor:
    """Sinusoidal features `(B, width)` of integer augmentation levels `(B,)`."""
    half = width // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, device=levels.device) / half)
    angles = levels.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class LowResConditioning(nn.Module):
    """Wrap a denoiser so that it sees an upsampled low-res clip and its augmentation level:
    `net(cat[x_t, up(low_res)], t, pooled = pooled + embed(aug_level))`.

    The level enters through the pooled (global) conditioning every effvid backbone already
    takes; its embedding's last layer is zero-initialised, so a fresh wrapper adds nothing.

    Args:
        net: the denoiser, built with `in_channels = 2 * channels`, `out_channels = channels`.
        pooled_dim: width of the net's pooled conditioning.
    """

    def __init__(self, net: nn.Module, pooled_dim: int) -> None:
        super().__init__()
        self.net = net
        self.level_embedding = nn.Sequential(nn.Linear(pooled_dim, pooled_dim), nn.SiLU(), nn.Linear(pooled_dim, pooled_dim))
        nn.init.zeros_(self.level_embedding[-1].weight)
        nn.init.zeros_(self.level_embedding[-1].bias)

    def forward(self, x: Tensor, timesteps: Tensor, low_res: Tensor, aug_level: Tensor, pooled: Tensor, **conditioning: Any) -> Tensor:
        # x: (B, C, F, H, W); low_res: (B, C, F, h, w); aug_level: (B,) int; pooled: (B, P)
        upsampled = resize_frames(low_res, tuple(x.shape[-2:]))  # (B, C, F, H, W)
        level = self.level_embedding(_level_features(aug_level, pooled.shape[-1]).to(pooled.dtype))
        return self.net(torch.cat([x, upsampled], dim=1), timesteps, pooled=pooled + level, **conditioning)


class LowResFrames(TextOnly):
    """The input of a super-resolution stage: a low-res clip, upsampled and concatenated to the
    noisy input (`LowResConditioning`), noised to a random level at training (noise-conditioning
    augmentation) and to `sample_aug_level` when sampling.

    Args:
        scale_factor: output / input resolution; training clips are downsampled by it.
        max_aug_level: training augmentation levels are uniform in [0, max_aug_level]
            (timesteps of the noise schedule; 0 = clean).
        sample_aug_level: the level applied to the low-res input at sampling.
        val_videos: validation clips upsampled (from the first val batch) and scored.
    """

    prompts_alone = False  # nothing to upsample from prompts alone: validation upsamples real clips

    def __init__(self, scale_factor: int = 2, max_aug_level: int = 250, sample_aug_level: int = 50, val_videos: int = 8) -> None:
        if scale_factor < 1:
            raise ValueError(f"scale_factor must be >= 1, got {scale_factor}")
        self.scale_factor = scale_factor
        self.max_aug_level, self.sample_aug_level = max_aug_level, sample_aug_level
        self.val_videos = val_videos
        self.noise_scheduler: Any = None

    def bind(self, module: Any) -> None:
        self.noise_scheduler = module.noise_scheduler  # augmentation noises with the diffusion's own schedule

    def wrap_net(self, net: nn.Module, text_encoder: nn.Module | None) -> nn.Module:
        return net if isinstance(net, LowResConditioning) else LowResConditioning(net, pooled_dim=text_encoder.pooled_dim)

    def low_res(self, videos: Tensor) -> Tensor:
        """The training input: `(B, C, F, H, W)` -> `(B, C, F, H / s, W / s)`."""
        height, width = videos.shape[-2:]
        return resize_frames(videos, (height // self.scale_factor, width // self.scale_factor))

    def augment(self, low_res: Tensor, levels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(low_res.shape, generator=generator).to(low_res)
        return torch.where(levels[:, None, None, None, None] > 0,
                           self.noise_scheduler.add_noise(low_res, noise, levels), low_res)

    def training(self, module: Any, batch: dict[str, Any], drop: bool) -> Conditioning:
        low_res = self.low_res(module.clean_data(batch))
        generator = None if drop else torch.Generator().manual_seed(0)  # fixed levels at validation
        levels = torch.randint(0, self.max_aug_level + 1, (low_res.shape[0],), generator=generator).to(low_res.device)
        return {"low_res": self.augment(low_res, levels, generator), "aug_level": levels}

    def sampling(self, module: Any, shape: tuple[int, ...], generator: torch.Generator, low_res: Tensor,
                 aug_level: int | None = None) -> SamplingRequest:  # fmt: skip
        """Videos `(B, C, F, H * s, W * s)` for low-res videos `low_res` `(B, C, F, H, W)`."""
        low_res = module.encode_data(low_res.to(module.device))
        level = self.sample_aug_level if aug_level is None else aug_level
        levels = torch.full((low_res.shape[0],), level, dtype=torch.long, device=low_res.device)
        frames = {"low_res": self.augment(low_res, levels, generator), "aug_level": levels}
        batch, channels, num_frames, height, width = low_res.shape
        return SamplingRequest((batch, channels, num_frames, height * self.scale_factor, width * self.scale_factor), frames)

    def on_validation_batch(self, module: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Upsample the first batch's clips, log PSNR against bilinear, write them side by side;
        the upsampled videos are the validation samples the metric callbacks score."""
        if batch_idx != 0 or self.val_videos <= 0 or module.trainer.sanity_checking:
            return
        videos = batch["video"][: self.val_videos]
        prompts = list(batch["caption"][: self.val_videos])
        upsampled = module.generate(prompts, seed=module.sample_seed, low_res=self.low_res(videos))
        bilinear = resize_frames(self.low_res(videos), tuple(videos.shape[-2:])).clamp(-1, 1)
        module.log_dict({"val/sr_psnr": psnr(upsampled, videos), "val/bilinear_psnr": psnr(bilinear, videos)},
                        batch_size=len(prompts))  # fmt: skip
        module.validation_samples = (prompts, upsampled)
        if module.trainer.is_global_zero:
            module.write_samples(prompts, torch.cat([bilinear, upsampled], dim=-1))  # bilinear | SR side by side


class SpatialSuperResolution(DiffusionModule):
    """A text-to-video model that upsamples a low-res clip by `scale_factor`: `LowResFrames`'
    arguments, then `DiffusionModule`'s (`video_shape` the high-res shape; the net built with
    `in_channels = 2 * channels`)."""

    def __init__(self, net: nn.Module, scale_factor: int = 2, max_aug_level: int = 250, sample_aug_level: int = 50,
                 val_videos: int = 8, **diffusion: Any) -> None:  # fmt: skip
        inputs = LowResFrames(scale_factor, max_aug_level, sample_aug_level, val_videos)
        super().__init__(net=net, inputs=inputs, **diffusion)

    @torch.no_grad()
    def upsample(self, prompts: Sequence[str], low_res: Tensor, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, aug_level: int | None = None) -> Tensor:
        """Videos `(B, C, F, H * s, W * s)` in [-1, 1] for low-res videos `(B, C, F, H, W)`."""
        return self.generate(prompts, sampler, steps, guidance_scale, seed, low_res=low_res, aug_level=aug_level)


def psnr(videos: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of videos in [-1, 1] against `reference`."""
    mse = F.mse_loss(videos.float(), reference.float()).clamp_min(1e-10)
    return float(10 * torch.log10(4.0 / mse))
