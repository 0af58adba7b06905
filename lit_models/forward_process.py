"""The forward process every paradigm trains against: noise levels, noise, the regression target
and the weighted denoising loss, over a diffusers noise schedule (DDPM-style, or flow matching:
x_t = (1 - sigma) x0 + sigma noise with a velocity target, `flow_matching.py`).

`ForwardProcess` is the part of `DiffusionModule` that needs only `self.net`,
`self.noise_scheduler`, `min_snr_gamma`, `flow_weighting` and `shared_noise_ratio`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import Tensor

from lit_models.flow_matching import flow_noised, flow_shift, is_flow_matching, training_sigmas

Conditioning = dict[str, Tensor]  # keyword arguments for the network besides x and timesteps

# Conditioning keys the core itself consumes (never passed to the network): frames given clean,
# `(B, C, F, H, W)` in diffusion space, where the `(B, F)` bool mask is True (I2V-Adapter's
# first frame). Those frames enter the network un-noised, are left out of the loss and are
# kept as given while sampling.
CLEAN_FRAMES, CLEAN_MASK = "clean_frames", "clean_mask"


def split_clean_frames(conditioning: Conditioning) -> tuple[Conditioning, Tensor | None]:
    """(the conditioning without the clean-frame keys, the `(B, 1, F, 1, 1)` mask or None)."""
    if CLEAN_FRAMES not in conditioning:
        return conditioning, None
    rest = {k: v for k, v in conditioning.items() if k not in (CLEAN_FRAMES, CLEAN_MASK)}
    mask = conditioning[CLEAN_MASK].bool()[:, None, :, None, None]  # (B, 1, F, 1, 1)
    return rest, mask


def with_clean_frames(x: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    """x `(B, C, F, H, W)` with the masked frames replaced by the clean ones."""
    return torch.where(mask, clean.to(x), x)


def decomposed_noise(shape: tuple[int, ...], shared_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise `(B, C, F, H, W)` split as VideoFusion (Luo et al. 2023) splits it: a base
    drawn once per clip and shared by all its frames, plus a per-frame residual,
    `sqrt(ratio) * base + sqrt(1 - ratio) * residual`. Every frame's noise stays N(0, I); frames
    are correlated by `ratio`. Ratio 0 draws exactly what `torch.randn(shape)` would from the
    same generator (i.i.d. noise), so the option is off bit for bit."""
    if not 0.0 <= shared_ratio <= 1.0:
        raise ValueError(f"shared_noise_ratio must be in [0, 1], got {shared_ratio}")
    residual = torch.randn(shape, generator=generator)  # (B, C, F, H, W)
    if shared_ratio == 0.0:
        return residual
    base = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator)  # (B, C, 1, H, W), one per clip
    return shared_ratio**0.5 * base + (1.0 - shared_ratio) ** 0.5 * residual


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) expressed for each prediction target.

    The weight is min(SNR, gamma) on the x0 loss; eps and v losses are x0 losses scaled by
    SNR and SNR + 1, hence the division.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")



class ForwardProcess:
    """Noising and the denoising loss (a mixin of `DiffusionModule`)."""

    @property
    def flow_matching(self) -> bool:
        return is_flow_matching(self.noise_scheduler)

    @property
    def prediction_type(self) -> str:
        return "flow_prediction" if self.flow_matching else self.noise_scheduler.config.prediction_type

    def sequence_length(self, shape: tuple[int, ...]) -> int:
        """Video tokens per sample of diffusion-space `shape` (resolution-dependent flow shifts)."""
        measure = getattr(self.net, "sequence_length", None)
        return int(measure(tuple(shape))) if measure is not None else int(torch.tensor(shape[2:]).prod())

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def draw_timesteps(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps `(B,)`: integers in [0, T) for DDPM-style schedules, sigma * T for
        flow matching (shifted as the schedule shifts at this clip size)."""
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if self.flow_matching:
            shift = flow_shift(self.noise_scheduler, self.sequence_length(tuple(x0.shape)))
            sigmas = training_sigmas(x0.shape[0], shift, self.flow_weighting, generator)
            return (sigmas * num_train_timesteps).to(x0.device)
        return torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """The forward process's noise for clips of `shape` (i.i.d. unless `shared_noise_ratio`)."""
        if len(shape) != 5:  # e.g. a single-image batch: nothing to share across
            return torch.randn(shape, generator=generator)
        return decomposed_noise(shape, self.shared_noise_ratio, generator)

    def noisy_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, the network's regression target) for clean `x0` and `noise` at `timesteps`."""
        if self.flow_matching:
            return flow_noised(x0, noise, timesteps, self.noise_scheduler.config.num_train_timesteps)
        return self.noise_scheduler.add_noise(x0, noise, timesteps), self.target(x0, noise, timesteps)

    def squared_errors(
        self, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One draw of the forward process on clean `x0` `(B, C, F, H, W)`: the squared error of
        the net's prediction against its target, elementwise `(B, C, F, H, W)`, the timesteps
        `(B,)`, and the mask of frames given clean (None when the conditioning gives none)."""
        timesteps = self.draw_timesteps(x0, generator)
        noise = self.draw_noise(tuple(x0.shape), generator).to(x0)  # (B, C, F, H, W)
        x_t, target = self.noisy_and_target(x0, noise, timesteps)
        clean = conditioning.get(CLEAN_FRAMES)
        conditioning, clean_mask = split_clean_frames(conditioning)
        if clean_mask is not None:
            x_t = with_clean_frames(x_t, clean, clean_mask)
        prediction = self.net(x_t, timesteps, **conditioning)
        return F.mse_loss(prediction.float(), target.float(), reduction="none"), timesteps, clean_mask

    def diffusion_loss(
        self, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weighted denoising loss per sample, shape `(B,)`."""
        loss, timesteps, clean_mask = self.squared_errors(x0, conditioning, generator)
        if clean_mask is None:
            loss = loss.flatten(1).mean(dim=1)  # (B,)
        else:  # the mean over the frames that were noised
            weight = (~clean_mask).to(loss.dtype).expand_as(loss)
            loss = (loss * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp_min(1.0)
        weights = self.loss_weights(timesteps)
        return loss if weights is None else loss * weights

    def loss_weights(self, timesteps: Tensor) -> Tensor | None:
        """Per-sample weights `(B,)` of the denoising loss at `timesteps`: Min-SNR for DDPM-style
        schedules when `min_snr_gamma` is set, else None (the plain MSE)."""
        if self.min_snr_gamma is None or self.flow_matching:
            return None
        snr = compute_snr(self.noise_scheduler, timesteps)
        return min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)

