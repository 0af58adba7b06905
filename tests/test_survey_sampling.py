"""Mechanism tests of the survey systems that act at sampling time or on the noise:
VideoFusion's decomposed noise, StoryDiffusion's consistent self-attention, ControlVideo's
cross-frame attention and frame smoother. Tiny tensors; each asserts the property the system
is built on."""

from __future__ import annotations

import pytest
import torch

from lit_models.forward_process import decomposed_noise


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


# --- training-free attention: StoryDiffusion and ControlVideo -----------------------------------


def attention_block(channels: int = 16) -> torch.nn.Module:
    """A spatial transformer whose output is not zero at init (so attention changes show)."""
    from lit_models.nets.layers import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(channels, heads=2, context_dim=None)
    torch.nn.init.normal_(block.proj_out.weight, std=0.5)
    return block.eval()


def run_block(block, x, num_frames, modifier=None, guided=False):
    from types import SimpleNamespace

    if modifier is None:
        return block(x, num_frames)
    with modifier.applied(SimpleNamespace(net=block), guided):
        return block(x, num_frames)


def test_consistent_self_attention_is_plain_attention_for_one_clip_or_rate_zero():
    from lit_models.training_free import ConsistentSelfAttention

    block = attention_block()
    one_clip = torch.randn(2, 16, 4, 4)  # (B*F, C, H, W): 1 clip of 2 frames
    plain = run_block(block, one_clip, 2)
    assert torch.allclose(run_block(block, one_clip, 2, ConsistentSelfAttention(0.5)), plain, atol=1e-6)
    three_clips = torch.randn(6, 16, 4, 4)
    assert torch.allclose(run_block(block, three_clips, 2, ConsistentSelfAttention(0.0)), run_block(block, three_clips, 2), atol=1e-6)
    assert "forward" not in vars(block.self_attention)  # unpatched on exit


def test_consistent_self_attention_reads_the_other_clips_of_its_guidance_half_only():
    from lit_models.training_free import ConsistentSelfAttention

    block = attention_block()
    x = torch.randn(4, 16, 4, 4)  # 4 clips of 1 frame
    changed = x.clone()
    changed[1] = torch.randn(16, 4, 4)  # clip 1 (same half as clip 0 when guided) changes
    consistent = ConsistentSelfAttention(rate=1.0)
    out, out_changed = run_block(block, x, 1, consistent), run_block(block, changed, 1, consistent)
    assert not torch.allclose(out[0], out_changed[0], atol=1e-4)  # clip 0 reads clip 1's tokens
    assert torch.allclose(run_block(block, x, 1)[0], run_block(block, changed, 1)[0])  # plain: it does not
    far = x.clone()
    far[2] = torch.randn(16, 4, 4)  # clip 2 is in the other half ([uncond; cond]) under guidance
    assert torch.allclose(run_block(block, x, 1, consistent, guided=True)[0], run_block(block, far, 1, consistent, guided=True)[0], atol=1e-6)


def test_cross_frame_attention_lets_each_frame_read_the_whole_clip():
    from lit_models.training_free import CrossFrameAttention

    block = attention_block()
    frame = torch.randn(1, 16, 4, 4)
    assert torch.allclose(run_block(block, frame, 1, CrossFrameAttention()), run_block(block, frame, 1), atol=1e-6)
    # identical frames: keys repeat, the softmax-weighted mean is the frame's own attention
    still = frame.repeat(3, 1, 1, 1)
    assert torch.allclose(run_block(block, still, 3, CrossFrameAttention()), run_block(block, still, 3), atol=1e-5)
    moved = still.clone()
    moved[2] = torch.randn(16, 4, 4)
    assert not torch.allclose(run_block(block, moved, 3, CrossFrameAttention())[0], run_block(block, still, 3)[0], atol=1e-4)
    assert torch.allclose(run_block(block, moved, 3)[0], run_block(block, still, 3)[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_interleaved_frame_smoother_replaces_alternate_frames_of_x0_by_their_neighbours_mean(prediction_type):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from lit_models.training_free import InterleavedFrameSmoother

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    prediction = torch.randn(2, 1, 5, 4, 4)
    x_t = torch.randn(2, 1, 5, 4, 4)
    module = SimpleNamespace(net=lambda x, t, **c: prediction, noise_scheduler=scheduler, flow_matching=False)
    abar = scheduler.alphas_cumprod[500]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()

    def x0_of(out):
        return (x_t - sigma * out) / alpha if prediction_type == "epsilon" else alpha * x_t - sigma * out

    with InterleavedFrameSmoother((400, 600)).applied(module, guided=False):
        first = module.net(x_t, torch.tensor([500, 500]))
        second = module.net(x_t, torch.tensor([500, 500]))
        outside = module.net(x_t, torch.tensor([700, 700]))
    x0, smoothed = x0_of(prediction), x0_of(first)
    assert torch.allclose(smoothed[:, :, [1, 3]], (x0[:, :, [0, 2]] + x0[:, :, [2, 4]]) / 2, atol=1e-4)  # odd frames
    assert torch.allclose(smoothed[:, :, [0, 2, 4]], x0[:, :, [0, 2, 4]], atol=1e-4)
    assert torch.allclose(x0_of(second)[:, :, 2], (x0[:, :, 1] + x0[:, :, 3]) / 2, atol=1e-4)  # then even ones
    assert torch.equal(outside, prediction)
    assert module.net(x_t, torch.tensor([500, 500])) is prediction  # unwrapped on exit


def test_sampling_applies_the_configured_modifiers_around_the_loop():
    from diffusers import DDPMScheduler

    from lit_models.diffusion import DiffusionModule
    from lit_models.nets.unet import FactorizedUNet
    from lit_models.training_free import CrossFrameAttention

    net = FactorizedUNet(channels=(8, 16), attention_levels=(False, True), temporal_levels=(False, False),
                         context_dim=None, pooled_dim=None, heads=2)
    module = DiffusionModule(net, DDPMScheduler(), torch.optim.AdamW, sampler="ddim", sampling_modifiers=[CrossFrameAttention()])
    attention = net.down_stages[1].transformer.self_attention
    seen = []
    attention.register_forward_hook(lambda m, a, o: seen.append("forward" in vars(m)))
    module.sample((1, 1, 2, 4, 4), {}, steps=2)
    assert seen == [True, True]  # one call per step, patched
    assert "forward" not in vars(attention)


@pytest.mark.slow
def test_controlvideo_samples_follow_the_control_clip_with_both_unets_cross_frame():
    from tests.test_peft import tiny_module, tiny_net

    from lit_models.nets.control import sobel_edges
    from lit_models.nets.layers import SpatialTransformer
    from lit_models.peft import ControlBranch
    from lit_models.training_free import CrossFrameAttention, InterleavedFrameSmoother

    module = tiny_module(tiny_net(), [ControlBranch()], control_signal="sobel_edges", video_shape=(1, 3, 8, 8),
                         sampling_modifiers=[CrossFrameAttention(), InterleavedFrameSmoother((0, 100))])
    for zero_conv in [*module.net.zero_convs, module.net.mid_zero_conv, module.net.hint[-1]]:
        torch.nn.init.normal_(zero_conv.weight, std=0.1)  # a "trained" branch
    patched_calls = []
    for block in module.net.modules():
        if isinstance(block, SpatialTransformer):
            block.self_attention.register_forward_hook(lambda m, a, o: patched_calls.append("forward" in vars(m)))
    torch.manual_seed(0)
    clips = torch.rand(2, 1, 3, 8, 8) * 2 - 1
    videos = module.generate_with_control(["a handwritten 3 moving up"], sobel_edges(clips[:1]), steps=2)
    other = module.generate_with_control(["a handwritten 3 moving up"], sobel_edges(clips[1:]), steps=2)
    assert videos.shape == (1, 1, 3, 8, 8)
    assert not torch.allclose(videos, other)
    # (3 spatial transformers in the base + 2 in the branch's encoder copy) x 2 steps x 2 videos, all cross-frame
    assert len(patched_calls) == 20 and all(patched_calls)
