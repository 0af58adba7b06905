"""The diffusion core every paradigm builds on: noising, targets, loss weighting, sampling.

A paradigm subclasses `DiffusionModule` and says two things: how a batch becomes network
conditioning (`condition`) and what it does with samples at validation
(`on_validation_epoch_start`, when the EMA weights are in place).
Noise schedules and samplers are diffusers schedulers, so a model trained here samples with
any of diffusers' solvers.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.training_utils import compute_snr
from torch import Tensor, nn

from lit_models.samplers import make_sampler

Conditioning = dict[str, Tensor]  # keyword arguments for the network besides x and timesteps


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


class DiffusionModule(L.LightningModule):
    """Denoising diffusion over videos `(B, C, F, H, W)` with a diffusers noise schedule.

    Args:
        net: denoiser called as `net(x_t, timesteps, **conditioning)`.
        noise_scheduler: diffusers `DDPMScheduler` defining the forward process and the
            prediction target (`epsilon`, `v_prediction` or `sample`).
        optimizer: partial taking the parameters (Hydra `_partial_: true`).
        lr_scheduler: optional partial taking the optimizer; stepped every optimizer step.
        min_snr_gamma: Min-SNR weighting; None for the plain MSE.
        sampler, sample_steps, guidance_scale, guidance_rescale: defaults for `sample`.
    """

    def __init__(
        self,
        net: nn.Module,
        noise_scheduler: DDPMScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        min_snr_gamma: float | None = 5.0,
        sampler: str = "dpmpp",
        sample_steps: int = 20,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.min_snr_gamma = min_snr_gamma
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        make_sampler(sampler, noise_scheduler)  # fail at construction on a bad sampler name

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    # --- what paradigms provide -------------------------------------------------------
    def condition(self, batch: dict[str, Any], drop: bool) -> Conditioning:
        """Network conditioning for a batch; `drop` applies classifier-free-guidance dropout."""
        return {}

    # --- training ---------------------------------------------------------------------
    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def diffusion_loss(
        self, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weighted denoising loss per sample, shape `(B,)`."""
        batch_size = x0.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        ).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)  # (B, C, F, H, W)
        x_t = self.noise_scheduler.add_noise(x0, noise, timesteps)
        prediction = self.net(x_t, timesteps, **conditioning)
        target = self.target(x0, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        loss = loss.flatten(1).mean(dim=1)  # (B,)
        if self.min_snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            loss = loss * min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)
        return loss

    def clean_data(self, batch: dict[str, Any]) -> Tensor:
        """A batch's clean data in the space the diffusion runs in, `(B, C, F, H, W)`."""
        return batch["video"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = self.clean_data(batch)
        loss = self.diffusion_loss(x0, self.condition(batch, drop=True)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Fixed noise and timesteps per batch, so validation losses are comparable across steps.
        generator = torch.Generator().manual_seed(batch_idx)
        x0 = self.clean_data(batch)
        loss = self.diffusion_loss(x0, self.condition(batch, drop=False), generator).mean()
        self.log("val/loss", loss, batch_size=x0.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        shape: tuple[int, ...],
        conditioning: Conditioning,
        unconditioning: Conditioning | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        guidance_rescale: float | None = None,
    ) -> Tensor:
        """Draw videos of `shape` `(B, C, F, H, W)`, in the data range [-1, 1].

        With `unconditioning` and a guidance scale other than 1, classifier-free guidance runs
        the conditional and unconditional passes as one batch. `guidance_rescale` (Lin et al.
        2023, sec. 3.4) pulls the guided prediction's std back towards the conditional one's.
        """
        rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
        scheduler = make_sampler(sampler or self.sampler, self.noise_scheduler)
        scheduler.set_timesteps(steps or self.sample_steps, device=self.device)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        guided = unconditioning is not None and scale != 1.0
        net_conditioning = (
            {k: torch.cat([unconditioning[k], conditioning[k]]) for k in conditioning} if guided else conditioning
        )
        x = torch.randn(shape, generator=generator).to(self.device) * scheduler.init_noise_sigma
        # Stochastic samplers (DDPM, LCM) draw their step noise from the same generator.
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            x_in = torch.cat([x_in, x_in]) if guided else x_in
            timesteps = t.expand(x_in.shape[0]).to(self.device)
            out = self.net(x_in, timesteps, **net_conditioning)
            if guided:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + scale * (out_cond - out_uncond)
                if rescale > 0:
                    out = rescale_noise_cfg(out, out_cond, guidance_rescale=rescale)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        return x.clamp(-1, 1)
