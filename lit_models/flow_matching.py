"""Rectified-flow (flow-matching) training and sampling, for the families that use it
(LTX-Video, Wan, HunyuanVideo): x_t = (1 - sigma) x0 + sigma noise, the network predicts the
velocity noise - x0 at timestep sigma * 1000.

The schedule is the folder's own diffusers scheduler (`FlowMatchEulerDiscreteScheduler`, or a
multistep solver with `use_flow_sigmas`), whose shift decides where training and sampling spend
their steps: a static `shift` / `flow_shift`, or LTX-Video's resolution-dependent one
(`use_dynamic_shifting`, mu from the token count, as its pipeline computes it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


def is_flow_matching(scheduler: object) -> bool:
    config = getattr(scheduler, "config", {})
    return (
        isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


def dynamic_mu(scheduler: object, sequence_length: int) -> float:
    """LTX-Video's `calculate_shift`: log-shift linear in the number of video tokens."""
    config = scheduler.config
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return sequence_length * slope + base_shift - slope * base_len


def flow_shift(scheduler: object, sequence_length: int | None = None) -> float:
    """The shift s of sigma -> s sigma / (1 + (s - 1) sigma) the scheduler applies."""
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        if sequence_length is None:
            raise ValueError("flow_shift: a dynamically shifted schedule needs the token count")
        return math.exp(dynamic_mu(scheduler, sequence_length))
    return float(config.get("shift") or config.get("flow_shift") or 1.0)


def shifted(sigmas: Tensor, shift: float) -> Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigmas(
    batch_size: int, shift: float, weighting: str = "logit_normal", generator: torch.Generator | None = None
) -> Tensor:
    """Noise levels `(B,)` for a training step: logit-normal (SD3, finetrainers' default) or
    uniform before the schedule's shift."""
    if weighting == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator))
    elif weighting == "uniform":
        u = torch.rand(batch_size, generator=generator)
    else:
        raise ValueError(f"flow weighting {weighting!r}: choose logit_normal or uniform")
    return shifted(u, shift)


def flow_noised(x0: Tensor, noise: Tensor, timesteps: Tensor, num_train_timesteps: int) -> tuple[Tensor, Tensor]:
    """(x_t, velocity target) at `timesteps` = sigma * T `(B,)`."""
    sigma = (timesteps.float() / num_train_timesteps).view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - sigma) * x0 + sigma * noise, noise - x0


def set_flow_timesteps(scheduler: object, steps: int, sequence_length: int, device: torch.device) -> None:
    """`set_timesteps` as the flow pipelines call it: LTX-Video / Hunyuan pass sigmas
    linspace(1, 1/N, N) (and mu when shifting dynamically) to the Euler scheduler; the
    multistep solvers (Wan's UniPC) shift their own grid by `flow_shift`."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = dynamic_mu(scheduler, sequence_length) if scheduler.config.get("use_dynamic_shifting") else None
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(steps, device=device)
