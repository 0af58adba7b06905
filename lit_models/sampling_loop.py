"""Sampling: the reverse process with any diffusers solver, classifier-free guidance, clean
(given) frames and training-free modifiers; and `generate`, videos from prompts plus whatever
else the paradigm's inputs take (a low-res clip, known frames, a control clip, a first image).

`Sampling` is the part of `DiffusionModule` that draws videos; the paradigm's inputs
(`lit_models/inputs.py`) say what a call adds to the text conditioning.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any, Callable

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor

from lit_models.flow_matching import set_flow_timesteps
from lit_models.forward_process import CLEAN_FRAMES, Conditioning, split_clean_frames, with_clean_frames
from lit_models.samplers import make_sampler


class Sampling:
    """The reverse process (a mixin of `DiffusionModule`)."""

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
        return x.clamp(-1, 1) if self.autoencoder is None else x

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        num_frames: int | None = None,
        **given: Any,
    ) -> Tensor:
        """Videos `(len(prompts), C, F, H, W)` in [-1, 1] for the prompts and what the paradigm's
        inputs take (`given`: a low-res clip, known frames, a first image, a control clip)."""
        channels, frames, height, width = self.video_shape
        shape = (len(prompts), channels, num_frames or frames, height, width)
        generator = torch.Generator().manual_seed(seed)
        request = self.inputs.sampling(self, shape, generator, **given)
        conditioning = {**self.encode_captions(prompts), **request.conditioning}
        unconditioning = {**self.encode_captions([""] * len(prompts)), **request.conditioning}
        latents = self.sample(request.shape, conditioning, unconditioning, sampler, steps, guidance_scale, generator,
                              initial_noise=request.initial_noise)  # fmt: skip
        return request.finish(self.decode_data(latents))

    def generate_with_control(self, prompts: Sequence[str], control: Tensor, seed: int = 0, **sampling: Any) -> Tensor:
        """Videos following a control clip `(B, K, F, H, W)` (a control-branch run)."""
        return self.generate(prompts, seed=seed, control=control, **sampling)


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
