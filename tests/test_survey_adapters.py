"""Mechanism tests of the survey systems that are adapters or editors on a frozen base:
I2V-Adapter, Ctrl-Adapter and MagicStick's control transform, DragVideo, X-Adapter. Tiny
tensors; each asserts the property the system is built on."""

from __future__ import annotations

import pytest
import torch

from tests.test_survey_sampling import InputRecorder


class OffAtFrameZero(InputRecorder):
    """Predicts zeros, except ones at frame 0."""

    def forward(self, x, timesteps, **conditioning):
        out = super().forward(x, timesteps)
        out[:, :, 0] = 1.0
        return out



# --- I2V-Adapter ------------------------------------------------------------------------------------


def i2v_module(**kwargs):
    from tests.test_peft import tiny_module, tiny_net

    from lit_models.image_to_video import ImageToVideoFineTuning
    from lit_models.peft import I2VAdapter

    module = tiny_module(tiny_net(), [I2VAdapter()], ImageToVideoFineTuning, video_shape=(1, 3, 8, 8), **kwargs)
    return tiny_net(), module


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- Ctrl-Adapter and MagicStick -----------------------------------------------------------------


def ctrl_adapter_module(sparse_control: float = 0.0):
    from tests.test_peft import tiny_module, tiny_net

    from lit_models.nets.control import ControlledUNet
    from lit_models.peft import CtrlAdapter

    controlnet = ControlledUNet(tiny_net(seed=3))  # "trained on an image model": no zero layer left
    for layer in [*controlnet.zero_convs, controlnet.mid_zero_conv, controlnet.hint[-1]]:
        torch.nn.init.normal_(layer.weight, std=0.1)
    return tiny_module(tiny_net(), [CtrlAdapter(controlnet, sparse_control)], control_signal="sobel_edges")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
