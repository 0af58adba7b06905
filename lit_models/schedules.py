"""Noise schedules: diffusers' DDPM scheduler with its schedule shifted towards more noise.

A denoiser learns from the caption only what it cannot read from the noisy input. Coarse
structure (where the digit is, which way it goes over the clip) is spread over many pixels and
frames, so it stays readable up to high noise levels; with the standard schedule only the last
few percent of timesteps hide it, and there the caption's direction is the only source, the
loss weight (Min-SNR) is near zero, and samplers spend one or two steps. Shifting the
log-SNR of every timestep down by `2 log(shift)` (simple diffusion, Hoogeboom et al. 2023; the
timestep shift of SD3, Open-Sora and Wan, which grows with the number of frames and pixels)
gives that regime a real share of training and sampling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DDPMScheduler


def shifted_ddpm_scheduler(shift: float = 1.0, **config: Any) -> DDPMScheduler:
    """A `DDPMScheduler(**config)` whose cumulative alphas have their log-SNR lowered by
    `2 log(shift)` at every timestep (`shift=1` is the scheduler unchanged).

    The shifted schedule is stored as `trained_betas`, so every sampler built from the
    scheduler's config (`lit_models.samplers.make_sampler`) and every checkpoint's config
    carries it.
    """
    if shift <= 0:
        raise ValueError(f"shifted_ddpm_scheduler: shift must be > 0, got {shift}")
    base = DDPMScheduler(**config)
    if shift == 1.0:
        return base
    alphas_cumprod = base.alphas_cumprod.double()
    log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)
    shifted = torch.sigmoid(log_snr - 2 * math.log(shift))  # (T,) cumulative alphas, more noise
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    betas = (1 - shifted / previous).clamp(0, 0.999)
    return DDPMScheduler(**{**config, "trained_betas": betas.tolist()})
