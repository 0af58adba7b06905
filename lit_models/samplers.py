"""Inference samplers: diffusers schedulers built from the training noise schedule."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


def make_sampler(name: str, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """Return a fresh inference scheduler named `name` for a model trained with `train_scheduler`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(train_scheduler.config, **overrides)
