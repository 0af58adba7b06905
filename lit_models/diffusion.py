"""The diffusion core every paradigm builds on: noising, targets, loss weighting, sampling.

A paradigm subclasses `DiffusionModule` and says two things: how a batch becomes network
conditioning (`condition`) and what it does with samples at validation
(`on_validation_epoch_start`, when the EMA weights are in place).
Noise schedules and samplers are diffusers schedulers, so a model trained here samples with
any of diffusers' solvers. A flow-matching schedule (LTX-Video, Wan) switches the forward
process to x_t = (1 - sigma) x0 + sigma noise with a velocity target (`flow_matching.py`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.training_utils import compute_snr
from torch import Tensor, nn

from lit_models.flow_matching import flow_noised, flow_shift, is_flow_matching, set_flow_timesteps, training_sigmas
from lit_models.samplers import make_sampler

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


class DiffusionModule(L.LightningModule):
    """Denoising diffusion over videos `(B, C, F, H, W)` with a diffusers noise schedule.

    Args:
        net: denoiser called as `net(x_t, timesteps, **conditioning)`.
        noise_scheduler: diffusers `DDPMScheduler` defining the forward process and the
            prediction target (`epsilon`, `v_prediction` or `sample`).
        optimizer: partial taking the parameters (Hydra `_partial_: true`).
        lr_scheduler: optional partial taking the optimizer; stepped every optimizer step.
        min_snr_gamma: Min-SNR weighting; None for the plain MSE (flow matching ignores it).
        sampler, sample_steps, guidance_scale, guidance_rescale: defaults for `sample`.
        flow_weighting: how a flow-matching model draws training noise levels before the
            schedule's shift (`logit_normal` or `uniform`).
        shared_noise_ratio: VideoFusion's decomposed noise (`decomposed_noise`), in training and
            in the sampler's starting noise; 0 is i.i.d. noise per frame.
        sampling_modifiers: training-free changes applied around every sampling run
            (`lit_models/training_free.py`: consistent or cross-frame attention, frame smoothing).
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
        flow_weighting: str = "logit_normal",
        shared_noise_ratio: float = 0.0,
        sampling_modifiers: Sequence[Any] = (),
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
        self.flow_weighting = flow_weighting
        decomposed_noise((1, 1, 1, 1, 1), shared_noise_ratio)  # fail at construction on a bad ratio
        self.shared_noise_ratio = shared_noise_ratio
        self.sampling_modifiers = list(sampling_modifiers)
        make_sampler(sampler, noise_scheduler)  # fail at construction on a bad sampler name

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

    def diffusion_loss(
        self, x0: Tensor, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weighted denoising loss per sample, shape `(B,)`."""
        timesteps = self.draw_timesteps(x0, generator)
        noise = self.draw_noise(tuple(x0.shape), generator).to(x0)  # (B, C, F, H, W)
        x_t, target = self.noisy_and_target(x0, noise, timesteps)
        clean = conditioning.get(CLEAN_FRAMES)
        conditioning, clean_mask = split_clean_frames(conditioning)
        if clean_mask is not None:
            x_t = with_clean_frames(x_t, clean, clean_mask)
        prediction = self.net(x_t, timesteps, **conditioning)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if clean_mask is None:
            loss = loss.flatten(1).mean(dim=1)  # (B,)
        else:  # the mean over the frames that were noised
            weight = (~clean_mask).to(loss.dtype).expand_as(loss)
            loss = (loss * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp_min(1.0)
        if self.min_snr_gamma is not None and not self.flow_matching:
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

    def parameter_groups(self) -> list[Tensor] | list[dict[str, Any]]:
        """What the optimizer trains: the trainable parameters, or param groups with own lrs."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
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
        initial_noise: Tensor | None = None,
    ) -> Tensor:
        """Draw videos of `shape` `(B, C, F, H, W)`, in the data range [-1, 1].

        With `unconditioning` and a guidance scale other than 1, classifier-free guidance runs
        the conditional and unconditional passes as one batch. `guidance_rescale` (Lin et al.
        2023, sec. 3.4) pulls the guided prediction's std back towards the conditional one's.
        `initial_noise` replaces the drawn starting noise (a noise prior); clean frames in
        `conditioning` (`CLEAN_FRAMES`) stay as given.
        """
        clean = conditioning.get(CLEAN_FRAMES)
        conditioning, clean_mask = split_clean_frames(conditioning)
        if unconditioning is not None:
            unconditioning = split_clean_frames(unconditioning)[0]
        rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
        steps = steps or self.sample_steps
        tokens = self.sequence_length(tuple(shape))
        scheduler = make_sampler(sampler or self.sampler, self.noise_scheduler, tokens)
        if self.flow_matching:
            set_flow_timesteps(scheduler, steps, tokens, self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        guided = unconditioning is not None and scale != 1.0
        net_conditioning = (
            {k: torch.cat([unconditioning[k], conditioning[k]]) for k in conditioning} if guided else conditioning
        )
        start = self.draw_noise(tuple(shape), generator) if initial_noise is None else initial_noise
        x = start.to(self.device) * getattr(scheduler, "init_noise_sigma", 1.0)
        step = _step_function(scheduler, generator)
        with contextlib.ExitStack() as modifiers:
            for modifier in self.sampling_modifiers:
                modifiers.enter_context(modifier.applied(self, guided))
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                if clean_mask is not None:  # after the input scaling, so the clean frames are x0 itself
                    x_in = with_clean_frames(x_in, clean, clean_mask)
                x_in = torch.cat([x_in, x_in]) if guided else x_in
                timesteps = t.expand(x_in.shape[0]).to(self.device)
                out = self.net(x_in, timesteps, **net_conditioning)
                if guided:
                    out_uncond, out_cond = out.chunk(2)
                    out = out_uncond + scale * (out_cond - out_uncond)
                    if rescale > 0:
                        out = rescale_noise_cfg(out, out_cond, guidance_rescale=rescale)
                x = step(out.float(), t, x)
        if clean_mask is not None:
            x = with_clean_frames(x, clean, clean_mask)
        # Pixel-space models are clamped to the data range; latents are not bounded.
        return x.clamp(-1, 1) if getattr(self, "autoencoder", None) is None else x


def _step_function(scheduler: Any, generator: torch.Generator | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`(model output, t, x) -> x at the next t` for a diffusers scheduler. Stochastic samplers
    (DDPM, LCM) draw their step noise from `generator`; CogVideoX's DPM scheduler also wants the
    previous x0 estimate and timestep (its pipeline keeps them; so does this closure)."""
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if type(scheduler).__name__ != "CogVideoXDPMScheduler":
        return lambda out, t, x: scheduler.step(out, t, x, **kwargs).prev_sample
    state: dict[str, Any] = {"x0": None, "t": None}

    def step(out: Tensor, t: Tensor, x: Tensor) -> Tensor:
        x, state["x0"] = scheduler.step(out, state["x0"], t, state["t"], x, return_dict=False, **kwargs)
        state["t"] = t
        return x

    return step
