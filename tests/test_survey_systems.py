"""Mechanism tests of the survey systems that are a module or an option rather than a whole
recipe: VideoFusion's decomposed noise, StoryDiffusion's consistent self-attention,
I2V-Adapter, ControlVideo's cross-frame attention and frame smoother, and the CogVideo-style
token paradigm. Tiny tensors; each asserts the property the system is built on."""

from __future__ import annotations

import pytest
import torch

from lit_models.diffusion import decomposed_noise


# --- VideoFusion: decomposed noise ------------------------------------------------------------


def test_decomposed_noise_ratio_zero_is_iid_noise_bit_exact():
    shape = (2, 1, 4, 8, 8)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(decomposed_noise(shape, 0.0, torch.Generator().manual_seed(3)), expected)


def test_decomposed_noise_ratio_one_shares_one_noise_across_frames():
    noise = decomposed_noise((2, 1, 4, 8, 8), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(noise, noise[:, :, :1].expand_as(noise))
    assert not torch.equal(noise[0], noise[1])  # shared by a clip's frames, not across clips


def test_decomposed_noise_keeps_unit_variance_per_frame_and_correlates_frames_by_the_ratio():
    noise = decomposed_noise((4000, 1, 3, 2, 2), 0.6, torch.Generator().manual_seed(0))
    per_frame = noise.transpose(0, 2).flatten(1)  # (F, everything else)
    assert torch.allclose(per_frame.var(dim=1), torch.ones(3), atol=0.05)
    correlation = torch.corrcoef(per_frame)[0, 1]
    assert abs(correlation - 0.6) < 0.05
    with pytest.raises(ValueError, match="shared_noise_ratio"):
        decomposed_noise((1, 1, 2, 2, 2), 1.5)


class InputRecorder(torch.nn.Module):
    """A stand-in denoiser that remembers what it was given and predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, timesteps, **conditioning):
        self.inputs.append(x.clone())
        return torch.zeros_like(x)


def test_diffusion_module_noises_training_clips_and_starts_sampling_with_the_decomposed_noise():
    from diffusers import DDPMScheduler

    from lit_models.diffusion import DiffusionModule

    recorder = InputRecorder()
    module = DiffusionModule(recorder, DDPMScheduler(), torch.optim.AdamW, shared_noise_ratio=1.0, sampler="ddim")
    module.diffusion_loss(torch.zeros(2, 1, 3, 4, 4), {})
    module.sample((2, 1, 3, 4, 4), {}, steps=1)
    for x in recorder.inputs:  # zero clips: x_t is scaled noise, identical across frames
        assert torch.equal(x, x[:, :, :1].expand_as(x))
