"""Inference samplers: diffusers schedulers built from the training noise schedule.

`pipeline` is the scheduler a pretrained bundle's folder ships (the family's own sampler, e.g.
CogVideoX's DDIM with its SNR shift, Wan's flow UniPC); the `flow_*` names are for
flow-matching models, the others for DDPM-style (epsilon / v) ones.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lit_models.flow_matching import flow_shift, is_flow_matching

# Where a bundle records its folder's scheduler config, `_class_name` included (the `pipeline` sampler).
PIPELINE_SCHEDULER_KEY = "effvid_pipeline_scheduler"

# name -> (scheduler class, overrides). Each is built from the training scheduler's config,
# so beta schedule and prediction type always match what the network learned.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    # The DDIM ODE progressive distillation trains on: grid from t = T - 1 down (few steps need
    # the start at pure noise), no x0 clipping.
    "ddim_trailing": (DDIMScheduler, {"set_alpha_to_one": False, "timestep_spacing": "trailing", "clip_sample": False}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    # DPM-Solver++(2M) SDE: the same solver on the reverse SDE; the fresh noise each step
    # corrects the errors a deterministic ODE sampler carries to the end (as DDPM's does).
    "dpmpp_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    # Multistep consistency sampling, for consistency-distilled students (lit_models/distillation.py);
    # its c_skip/c_out are the ones `consistency_scalings` trains with.
    "lcm": (LCMScheduler, {"set_alpha_to_one": False}),
    # Trajectory-consistency sampling (Zheng et al. 2024): LCM's steps, but each re-noises only
    # part of the way (`eta`, gamma in the paper), keeping some of the predicted noise.
    "tcd": (TCDScheduler, {"set_alpha_to_one": False}),
}


# Flow-matching samplers: the velocity prediction on flow sigmas, shifted as in training.
FLOW_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow_unipc": (UniPCMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "flow_dpmpp": (DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                 "algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def sampler_names(train_scheduler: SchedulerMixin) -> list[str]:
    names = list(FLOW_SAMPLERS) if is_flow_matching(train_scheduler) else list(SAMPLERS)
    return ["pipeline", *names] if train_scheduler.config.get(PIPELINE_SCHEDULER_KEY) else names


def make_sampler(name: str, train_scheduler: SchedulerMixin, sequence_length: int | None = None) -> SchedulerMixin:
    """Return a fresh inference scheduler named `name` for a model trained with `train_scheduler`
    (`sequence_length`: video tokens per sample, for resolution-dependent flow shifts)."""
    config = {k: v for k, v in train_scheduler.config.items() if k != PIPELINE_SCHEDULER_KEY}
    allowed = sampler_names(train_scheduler)
    if name not in allowed:
        kind = "flow-matching" if is_flow_matching(train_scheduler) else "DDPM-style (epsilon / v)"
        raise ValueError(f"sampler {name!r} does not fit this {kind} model; choose one of {allowed}")
    if name == "pipeline":
        folder_config = dict(train_scheduler.config[PIPELINE_SCHEDULER_KEY])
        return getattr(diffusers, folder_config["_class_name"]).from_config(folder_config)
    if name in FLOW_SAMPLERS:
        cls, overrides = FLOW_SAMPLERS[name]
        if cls is not FlowMatchEulerDiscreteScheduler:  # the multistep solvers take a static shift
            shift = flow_shift(train_scheduler, sequence_length or 4096)
            overrides = {**overrides, "flow_shift": shift, "use_dynamic_shifting": False}
        return cls.from_config(config, **overrides)
    cls, overrides = SAMPLERS[name]
    sampler = cls.from_config(config, **overrides)
    trained = getattr(train_scheduler, "alphas_cumprod", None)
    if trained is not None and not torch.allclose(sampler.alphas_cumprod, trained):
        # e.g. CogVideoX's snr_shift_scale, which only its own schedulers apply
        raise ValueError(
            f"sampler {name!r} would not reproduce this model's noise schedule "
            f"({type(train_scheduler).__name__}); use sampler=pipeline"
        )
    return sampler
