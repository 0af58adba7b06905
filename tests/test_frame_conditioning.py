"""Masked-frame conditioning: training masks, the input concatenation, extension and
interpolation at sampling, and effvid-sample's --extend / --interpolate flags."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from experiments.sample import translate_flags
from lit_models.conditioning import MaskedFrameConditioning, OpenClipTextEncoder, random_frame_masks
from lit_models.frame_conditioned import FrameConditionedTextToVideo
from lit_models.nets import FactorizedUNet, TemporalAttention


def test_random_masks_cover_each_mode():
    generator = torch.Generator().manual_seed(0)
    assert random_frame_masks(3, 6, ("none",), generator).sum() == 0
    assert random_frame_masks(3, 6, ("image_to_video",), generator).tolist() == [[True] + [False] * 5] * 3
    prefix = random_frame_masks(50, 6, ("prediction",), generator)
    counts = prefix.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 5 and len(set(counts.tolist())) > 2
    assert all(row[: int(n)].all() for row, n in zip(prefix, counts))  # a prefix, not any frames
    every_other = random_frame_masks(20, 6, ("interpolation",), generator)
    assert {tuple(r) for r in every_other.int().tolist()} == {(1, 0, 1, 0, 1, 0), (0, 1, 0, 1, 0, 1)}
    with pytest.raises(ValueError, match="unknown modes"):
        random_frame_masks(1, 2, ("extrapolate",))


class Recorder(torch.nn.Module):
    def forward(self, x, timesteps, **kwargs):
        self.seen = x
        return x[:, :1]


def test_known_frames_and_mask_are_concatenated_to_the_noisy_input():
    wrapper = MaskedFrameConditioning(Recorder())
    x, known = torch.randn(2, 1, 3, 4, 4), torch.randn(2, 1, 3, 4, 4)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    wrapper(x, torch.tensor([1, 2]), known=known, known_mask=mask)
    seen = wrapper.net.seen  # (B, 2C+1, F, H, W)
    assert seen.shape == (2, 3, 3, 4, 4)
    torch.testing.assert_close(seen[:, :1], x)
    torch.testing.assert_close(seen[0, 1, 0], known[0, 0, 0])
    assert seen[0, 1, 1:].abs().sum() == 0 and seen[1, 1, :2].abs().sum() == 0  # unknown frames hidden
    assert seen[:, 2].mean(dim=(-1, -2)).tolist() == mask.float().tolist()
    wrapper(x, torch.tensor([1, 2]))
    assert wrapper.net.seen[:, 1:].abs().sum() == 0  # plain generation: nothing known


@pytest.fixture(scope="module")
def model() -> FrameConditionedTextToVideo:
    torch.manual_seed(0)
    net = FactorizedUNet(
        in_channels=3, out_channels=1, channels=(8, 16), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=16, pooled_dim=16, temporal=partial(TemporalAttention, heads=4),
    )  # fmt: skip
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.1)  # not all zeros, so samples depend on the inputs
    encoder = OpenClipTextEncoder(text_cfg=dict(width=16, layers=1, heads=4, context_length=12, vocab_size=49408), embed_dim=16)
    return FrameConditionedTextToVideo(
        net=net, text_encoder=encoder, noise_scheduler=DDPMScheduler(prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), video_shape=(1, 4, 8, 8), sample_steps=2, guidance_scale=2.0,
    ).eval()  # fmt: skip


def test_training_conditioning_carries_known_frames(model):
    batch = {"video": torch.randn(4, 1, 4, 8, 8), "caption": ["a handwritten 1 moving up"] * 4}
    conditioning = model.condition(batch, drop=True)
    assert conditioning["known_mask"].shape == (4, 4)
    assert model.diffusion_loss(batch["video"], conditioning).shape == (4,)


def test_extend_appends_frames_and_keeps_the_given_ones(model):
    prompts = ["a handwritten 3 moving up", "a handwritten 5 moving left"]
    first = model.generate(prompts, seed=0)
    longer = model.extend(prompts, first, num_new=5, seed=1)
    assert longer.shape == (2, 1, 9, 8, 8)
    torch.testing.assert_close(longer[:, :, :4], first)
    assert not torch.allclose(longer[:, :, 4], longer[:, :, 3])


def test_interpolate_doubles_the_frame_rate_around_the_given_frames(model):
    prompts = ["a handwritten 3 moving up"]
    video = model.generate(prompts, seed=0)
    finer = model.interpolate(prompts, video, seed=1)
    assert finer.shape == (1, 1, 7, 8, 8)
    torch.testing.assert_close(finer[:, :, ::2], video)
    assert finer[:, :, 1::2].abs().sum() > 0  # every in-between frame was generated


def test_sample_flags_become_hydra_overrides():
    assert translate_flags(["run=abc", "--extend", "16", "--interpolate"]) == ["run=abc", "extend=16", "interpolate=true"]
    assert translate_flags(["--extend=8"]) == ["extend=8"]
