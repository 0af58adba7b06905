"""Inference samplers: diffusers schedulers built from the training noise schedule."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (scheduler class, overrides). Each is built from the training scheduler's config,
# so beta schedule and prediction type always match what the network learned.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_sampler(name: str, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """Return a fresh inference scheduler named `name` for a model trained with `train_scheduler`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(train_scheduler.config, **overrides)
