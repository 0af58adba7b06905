"""The shifted noise schedule: log-SNR lowered by 2 log(shift) at every timestep, carried by
the samplers built from it."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lit_models.samplers import make_sampler
from lit_models.schedules import shifted_ddpm_scheduler

CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def log_snr(scheduler) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.double()
    return torch.log(alphas) - torch.log1p(-alphas)


def test_shift_lowers_every_log_snr_by_twice_its_log():
    base, shifted = DDPMScheduler(**CONFIG), shifted_ddpm_scheduler(4.0, **CONFIG)
    difference = (log_snr(base) - log_snr(shifted))[:-1]  # the last step is pure noise in both
    torch.testing.assert_close(difference, torch.full_like(difference, 2 * math.log(4.0)), atol=1e-3, rtol=0)
    assert shifted.config.prediction_type == "v_prediction"


def test_samplers_built_from_the_shifted_scheduler_use_its_schedule():
    shifted = shifted_ddpm_scheduler(4.0, **CONFIG)
    sampler = make_sampler("dpmpp", shifted)
    torch.testing.assert_close(sampler.alphas_cumprod, shifted.alphas_cumprod.to(sampler.alphas_cumprod.dtype))


def test_shift_one_is_the_plain_scheduler_and_bad_shifts_are_refused():
    torch.testing.assert_close(shifted_ddpm_scheduler(1.0, **CONFIG).alphas_cumprod, DDPMScheduler(**CONFIG).alphas_cumprod)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shifted_ddpm_scheduler(0.0, **CONFIG)
