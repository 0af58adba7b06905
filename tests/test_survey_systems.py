"""Mechanism tests of the survey systems that are a module or an option rather than a whole
recipe: VideoFusion's decomposed noise, StoryDiffusion's consistent self-attention,
I2V-Adapter, ControlVideo's cross-frame attention and frame smoother, and the CogVideo-style
token paradigm. Tiny tensors; each asserts the property the system is built on."""

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


class OffAtFrameZero(InputRecorder):
    """Predicts zeros, except ones at frame 0."""

    def forward(self, x, timesteps, **conditioning):
        out = super().forward(x, timesteps)
        out[:, :, 0] = 1.0
        return out


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


# --- I2V-Adapter ------------------------------------------------------------------------------------


def i2v_module(**kwargs):
    from tests.test_peft import tiny_module, tiny_net

    from lit_models.image_to_video import ImageToVideoFineTuning
    from lit_models.peft import I2VAdapter

    module = tiny_module(tiny_net(), [I2VAdapter()], ImageToVideoFineTuning, video_shape=(1, 3, 8, 8), **kwargs)
    return tiny_net(), module


def test_i2v_adapter_starts_as_the_base_bit_exact_and_trains_only_its_branch():
    from tests.test_peft import batch, full_state, one_step

    from lit_models.forward_process import split_clean_frames

    base, module = i2v_module()
    data = batch(frames=3)
    x, t = data["video"], torch.tensor([10, 60])
    conditioning, mask = split_clean_frames(module.condition(data, drop=False))
    assert mask[:, :, 0].all() and not mask[:, :, 1:].any()
    assert torch.equal(module.net(x, t, **conditioning), base(x, t, **conditioning))
    before = full_state(module)
    one_step(module, data)
    changed = {k for k, v in full_state(module).items() if not torch.equal(before[k], v)}
    assert changed and all(".first_frame_" in k for k in changed), sorted(changed)[:4]
    assert {k for k in before if ".first_frame_out." in k} <= changed  # the zero output layer learns


def test_i2v_branch_reads_the_first_frame_and_clean_frames_leave_the_loss():
    from lit_models.forward_process import CLEAN_FRAMES, CLEAN_MASK
    from lit_models.nets.layers import Attention

    _, module = i2v_module()
    branch = next(m for m in module.net.modules() if type(m).__name__ == "FirstFrameAttention")
    torch.nn.init.normal_(branch.first_frame_out.weight)
    branch.frames.value = 3
    x = torch.randn(2 * 3, 4, 16)  # (B*F, S, D)
    changed = x.clone()
    changed[3] = torch.randn(4, 16)  # clip 1, frame 0
    out, out_changed = branch(x), branch(changed)
    assert not torch.allclose(out[4:], out_changed[4:])  # clip 1's other frames read its first frame
    assert torch.equal(out[:3], out_changed[:3])  # clip 0 does not
    assert isinstance(branch.base, Attention)

    # The loss ignores the clean frame: a prediction off only there costs nothing.
    recorder = InputRecorder()
    module.net = recorder
    x0 = torch.randn(2, 1, 3, 8, 8)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[:, 0] = True
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss = module.diffusion_loss(x0, {CLEAN_FRAMES: x0, CLEAN_MASK: mask}, generator())
    assert torch.equal(recorder.inputs[-1][:, :, 0], x0[:, :, 0])  # given un-noised
    module.net = OffAtFrameZero()
    assert torch.allclose(module.diffusion_loss(x0, {CLEAN_FRAMES: x0, CLEAN_MASK: mask}, generator()), loss)


def test_generate_from_image_keeps_the_first_frame_and_the_prior_is_plain_noise_at_strength_zero():
    _, module = i2v_module()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    videos = module.generate_from_image(["a handwritten 3 moving up", "a handwritten 7 moving left"], images, steps=2)
    assert videos.shape == (2, 1, 3, 8, 8) and torch.allclose(videos[:, :, 0], images)
    first, shape = images[:, :, None], (2, 1, 3, 8, 8)
    plain = module.draw_noise(shape, torch.Generator().manual_seed(5))
    assert torch.equal(module.inputs.frame_similarity_noise(module, first, shape, torch.Generator().manual_seed(5)), plain)
    module.inputs.prior_strength = 1.0
    prior = module.inputs.frame_similarity_noise(module, first, shape, torch.Generator().manual_seed(5))
    assert torch.equal(prior, prior[:, :, :1].expand_as(prior))  # every frame starts from the noised image
    assert torch.corrcoef(torch.stack([prior[:, :, 0].flatten(), first.flatten()]))[0, 1] > 0.2


# --- CogVideo-style tokens ----------------------------------------------------------------------


def token_module(**kwargs):
    from tests.test_peft import TEXT_CFG

    from lit_models.conditioning import OpenClipTextEncoder
    from lit_models.nets.video_tokens import FrameVQTokenizer, VideoTokenTransformer
    from lit_models.token_video import TokenVideoGeneration

    torch.manual_seed(0)
    return TokenVideoGeneration(
        net=VideoTokenTransformer(codebook_size=16, tokens_per_frame=16, max_frames=4, pooled_dim=16, dim=32, depth=1, heads=2),
        tokenizer=FrameVQTokenizer(1, block_out_channels=(8, 8), latent_channels=4, codebook_size=16, norm_num_groups=4),
        text_encoder=OpenClipTextEncoder(model_name=None, text_cfg=TEXT_CFG, embed_dim=16, freeze_token_embedding=True),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3), num_frames=2, frame_strides=(1, 2), **kwargs,
    )  # fmt: skip


def test_token_model_loss_falls_and_samples_decode_to_clips():
    module = token_module()
    torch.manual_seed(1)
    data = {"video": torch.rand(2, 1, 3, 8, 8) * 2 - 1, "caption": ["a handwritten 3 moving up", "a handwritten 7 moving left"]}
    optimizer = module.configure_optimizers()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same frame strides every step
    first = {k: v.item() for k, v in module.losses(data, generator()).items()}
    for _ in range(8):
        optimizer.zero_grad()
        module.losses(data, generator())["loss"].backward()
        optimizer.step()
    last = {k: v.item() for k, v in module.losses(data, generator()).items()}
    assert last["token_ce"] < 0.9 * first["token_ce"] and last["recon"] < first["recon"], (first, last)
    videos = module.generate(["a handwritten 3 moving up"], frame_stride=1)
    assert videos.shape == (1, 1, 2, 8, 8) and videos.abs().max() <= 1
    with pytest.raises(ValueError, match="frame_stride=3"):
        module.generate(["a handwritten 3 moving up"], frame_stride=3)


def test_token_model_frame_rate_classes_take_every_rth_frame_of_the_dense_clip():
    module = token_module()
    video = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(4, 1, 3, 8, 8)  # frame i holds i
    clips, classes = module.subsample(video, torch.Generator().manual_seed(0))
    for clip, rate in zip(clips, classes.tolist()):
        assert clip[0, :, 0, 0].tolist() == [0.0, (1.0, 2.0)[rate]]
    with pytest.raises(ValueError, match="data.frame_stride=1, data.num_frames=3"):
        module.subsample(video[:, :, :2])


def test_cogvideo_experiment_builds_a_token_model_that_fits_the_digit_clips():
    from hydra.utils import instantiate

    from tests.test_experiment_configs import compose_experiment

    cfg = compose_experiment("cogvideo", ["model.dim=16", "model.depth=1", "model.heads=2", "paradigm.text_encoder.text_cfg.width=16",
                                          "paradigm.text_encoder.text_cfg.layers=1", "paradigm.text_encoder.embed_dim=16",
                                          "paradigm.tokenizer.block_out_channels=[8,8,8]", "paradigm.tokenizer.norm_num_groups=4"])
    module = instantiate(cfg.paradigm, net=instantiate(cfg.model))
    video = torch.rand(2, cfg.data.channels, cfg.data.num_frames, cfg.data.size, cfg.data.size) * 2 - 1
    losses = module.losses({"video": video, "caption": ["a handwritten 3 moving up"] * 2})
    assert torch.isfinite(losses["loss"])


# --- Ctrl-Adapter and MagicStick -----------------------------------------------------------------


def ctrl_adapter_module(sparse_control: float = 0.0):
    from tests.test_peft import tiny_module, tiny_net

    from lit_models.nets.control import ControlledUNet
    from lit_models.peft import CtrlAdapter

    controlnet = ControlledUNet(tiny_net(seed=3))  # "trained on an image model": no zero layer left
    for layer in [*controlnet.zero_convs, controlnet.mid_zero_conv, controlnet.hint[-1]]:
        torch.nn.init.normal_(layer.weight, std=0.1)
    return tiny_module(tiny_net(), [CtrlAdapter(controlnet, sparse_control)], control_signal="sobel_edges")


def test_ctrl_adapter_starts_as_the_backbone_and_trains_only_its_adapters():
    from tests.test_peft import batch, full_state, one_step, tiny_net

    module = ctrl_adapter_module(sparse_control=0.5)
    data = batch(frames=3)
    x, t = data["video"], torch.tensor([10, 60])
    conditioning = module.condition(data, drop=False)
    base_conditioning = {k: v for k, v in conditioning.items() if k != "control"}
    assert torch.equal(module.net(x, t, **conditioning), tiny_net()(x, t, **base_conditioning))
    before = full_state(module)
    one_step(module, data)
    changed = {k for k, v in full_state(module).items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("net.adapters.", "net.mid_adapter.")) for k in changed), sorted(changed)[:4]
    assert not any(p.requires_grad for p in module.net.controlnet.parameters())


def test_ctrl_adapter_sparse_control_reaches_uncontrolled_frames_through_its_temporal_layers():
    from tests.test_peft import batch

    module = ctrl_adapter_module().eval()
    for name, parameter in module.net.named_parameters():
        if "adapter" in name:
            torch.nn.init.normal_(parameter, std=0.2)  # "trained" adapters
    data = batch(frames=3)
    x, t = data["video"], torch.tensor([10, 60])
    text = {k: v for k, v in module.condition(data, drop=False).items() if k != "control"}
    control = torch.rand(2, 1, 3, 8, 8)
    only_first = torch.tensor([[True, False, False]] * 2)

    def run(signal):
        return module.net(x, t, control=signal, control_frames=only_first, **text)

    out = run(control)
    other_last, other_first = control.clone(), control.clone()
    other_last[:, :, 2] = torch.rand(2, 1, 8, 8)
    other_first[:, :, 0] = torch.rand(2, 1, 8, 8)
    assert torch.equal(run(other_last), out)  # frame 2 has no control: its signal is never read
    assert not torch.allclose(run(other_first)[:, :, 1], out[:, :, 1])  # frame 0's control reaches frame 1


def test_transform_control_moves_and_scales_the_signal_about_its_centroid():
    from lit_models.nets.control import transform_control

    control = torch.zeros(1, 1, 2, 16, 16)
    control[..., 6:9, 5:8] = 1.0  # a 3x3 blob centred at (7, 6)

    def centroid_and_spread(c):
        mass = c[0, 0, 0]
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        cy, cx = (mass * ys).sum() / mass.sum(), (mass * xs).sum() / mass.sum()
        return cy.item(), cx.item(), ((mass * ((ys - cy) ** 2)).sum() / mass.sum()).item()

    assert torch.allclose(transform_control(control), control, atol=1e-6)
    cy, cx, _ = centroid_and_spread(transform_control(control, shift=(3.0, -2.0)))
    assert (cy, cx) == pytest.approx((10.0, 4.0), abs=1e-4)
    _, _, spread = centroid_and_spread(control)
    cy, cx, scaled_spread = centroid_and_spread(transform_control(control, scale=2.0))
    assert (cy, cx) == pytest.approx((7.0, 6.0), abs=1e-4) and scaled_spread > 2.5 * spread


# --- DragVideo ------------------------------------------------------------------------------------


def test_drag_editor_samples_features_bilinearly_and_tracks_a_moved_feature():
    from lit_models.drag_editing import DragEditor, features_at

    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)  # value = x
    assert features_at(ramp, torch.tensor([[[2.0, 3.25]]])).item() == pytest.approx(3.25)
    torch.manual_seed(0)
    features = torch.randn(1, 4, 8, 8)
    start = features_at(features, torch.tensor([[[3.0, 3.0]]]))
    moved = torch.roll(features, shifts=(1, 2), dims=(2, 3))
    assert DragEditor(search_radius=2).track(moved, start, torch.tensor([[[3.0, 3.0]]])).tolist() == [[[4.0, 5.0]]]


def test_drag_editor_moves_the_handle_features_towards_the_target():
    from tests.test_peft import tiny_net

    from lit_models.drag_editing import DragEditor

    net = tiny_net()
    editor = DragEditor(up_stage=1, iterations=4, lr=0.05)
    x_t, t = torch.randn(1, 1, 2, 8, 8), torch.tensor([500])
    handles = torch.tensor([[[[3.0, 3.0]], [[4.0, 3.0]]]])  # (B, F, P, 2)
    targets = handles + torch.tensor([0.0, 3.0])

    def loss(x):
        with torch.no_grad():
            return editor.motion_loss(editor.features(net, x, t, {}), handles[0], targets[0]).item()

    dragged, tracked = editor.drag(net, x_t, t, {}, handles, targets)
    assert loss(dragged) < loss(x_t) and tracked.shape == handles.shape
    assert all(p.requires_grad for p in net.parameters()) and all(p.grad is None for p in net.parameters())


# --- X-Adapter ------------------------------------------------------------------------------------


def test_x_adapter_starts_as_the_new_base_trains_only_its_mappers_and_carries_an_old_plugin():
    from tests.test_peft import TEXT_CFG, batch, full_state, one_step, tiny_module, tiny_net

    from lit_models.conditioning import OpenClipTextEncoder
    from lit_models.peft import LoRA, XAdapter

    torch.manual_seed(7)
    old_text_encoder = OpenClipTextEncoder(model_name=None, text_cfg=TEXT_CFG, embed_dim=16)
    module = tiny_module(tiny_net(), [XAdapter(tiny_net(seed=5), old_text_encoder)])
    data = batch(frames=2)
    x, t = data["video"], torch.tensor([10, 60])
    conditioning = module.condition(data, drop=False)
    assert {"old_context", "old_pooled"} <= set(conditioning)
    new_only = {k: v for k, v in conditioning.items() if not k.startswith("old_")}
    assert torch.equal(module.net(x, t, **conditioning), tiny_net()(x, t, **new_only))
    before = full_state(module)
    one_step(module, data)
    changed = {k for k, v in full_state(module).items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("net.mappers.") for k in changed), sorted(changed)[:4]

    with torch.no_grad():
        adapted = module.net(x, t, **conditioning)
        LoRA(rank=2, alpha=2)(module.net.old_base)  # a plugin made for the old base
        for name, parameter in module.net.old_base.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)
        assert not torch.allclose(module.net(x, t, **conditioning), adapted, atol=1e-5)
