"""The temporal ops' shared contract: shapes, images (F = 1 or masked frames), causality,
parameter counts, and the alpha-mixed wrapper starting at the image model."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from lit_models.nets import (
    AlphaMixed,
    FactorizedUNet,
    SpaceTimeAttention,
    SwappedCrossAttention,
    TemporalAttention,
    TemporalConv,
    TemporalShift,
)

OPS = {
    "attention": partial(TemporalAttention, heads=4),
    "attention_frame_positions": partial(TemporalAttention, heads=4, frame_positions=True),
    "conv1d": TemporalConv,
    "conv1d_frame_positions": partial(TemporalConv, frame_positions=True),
    "shift": TemporalShift,
    "causal_attention": partial(TemporalAttention, heads=4, causal=True),
    "swapped_cross_attention": partial(SwappedCrossAttention, heads=4),
    "spacetime_attention": partial(SpaceTimeAttention, heads=2),
    "alpha_attention": partial(AlphaMixed, op=partial(TemporalAttention, heads=4)),
    "alpha_shift": partial(AlphaMixed, op=TemporalShift),
}


def randomize_(module: nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.3)


def clips(batch: int, frames: int, channels: int = 16, size: int = 3) -> torch.Tensor:
    return torch.randn(batch * frames, channels, size, size)  # (B*F, C, H, W)


@pytest.mark.parametrize("name", OPS)
def test_op_keeps_shape_mixes_frames_and_is_identity_for_images(name):
    torch.manual_seed(0)
    op = OPS[name](16)
    randomize_(op)
    x = clips(2, 5)
    out = op(x, num_frames=5)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)  # frames do mix (the test below is not about a no-op)
    images = clips(6, 1)
    assert torch.equal(op(images, num_frames=1), images)


@pytest.mark.parametrize("name", OPS)
def test_masked_image_frames_pass_unchanged_and_feed_nothing_to_the_video(name):
    """VDM's joint batch: a 4-frame clip with 2 independent images appended on the frame axis."""
    torch.manual_seed(0)
    op = OPS[name](16)
    randomize_(op)
    video, images = torch.randn(2, 4, 16, 3, 3), torch.randn(2, 2, 16, 3, 3)
    joint = torch.cat([video, images], dim=1).flatten(0, 1)  # (B*6, C, H, W)
    image_frames = torch.tensor([[False] * 4 + [True] * 2] * 2)

    out = op(joint, 6, image_frames).view(2, 6, 16, 3, 3)
    torch.testing.assert_close(out[:, 4:], images, rtol=0, atol=0)
    alone = op(video.flatten(0, 1), 4).view(2, 4, 16, 3, 3)
    torch.testing.assert_close(out[:, :4], alone, atol=1e-5, rtol=1e-5)

    # Other images change nothing in the clip's frames.
    other = torch.cat([video, torch.randn_like(images)], dim=1).flatten(0, 1)
    torch.testing.assert_close(op(other, 6, image_frames).view(2, 6, 16, 3, 3)[:, :4], out[:, :4], atol=1e-5, rtol=1e-5)


def test_image_frames_mask_must_match_the_batch():
    with pytest.raises(ValueError, match=r"expected \(B, F\) = \(2, 3\)"):
        TemporalConv(16)(clips(2, 3), 3, torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ["attention", "conv1d"])
def test_frame_positions_tell_the_frames_of_a_still_clip_apart(name):
    """Without them every frame of a clip of identical frames gets the same output (attention)
    or differs only through the padding at the clip's ends (conv); with them each frame knows
    its index, which the mean of a prompted motion needs."""
    torch.manual_seed(0)
    plain, positioned = OPS[name](16), OPS[f"{name}_frame_positions"](16)
    randomize_(plain)
    positioned.load_state_dict(plain.state_dict(), strict=False)
    still = torch.randn(1, 1, 16, 3, 3).expand(2, 6, 16, 3, 3).flatten(0, 1)  # 6 identical frames
    out_plain = plain(still, 6).view(2, 6, 16, 3, 3)
    out_positioned = positioned(still, 6).view(2, 6, 16, 3, 3)
    inner = out_plain[:, 1:5] - out_plain[:, 2:3]  # frames away from the ends
    assert inner.abs().max() < 1e-5
    assert (out_positioned[:, 1:5] - out_positioned[:, 2:3]).abs().amax(dim=(0, 2, 3, 4))[[0, 2, 3]].min() > 1e-3


@pytest.mark.parametrize("kind", ["index", "index_and_text"])
def test_unet_frame_embedding_gives_frame_dependent_outputs_and_leaves_images_alone(kind):
    torch.manual_seed(0)
    net = FactorizedUNet(
        channels=(16, 32), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=32, pooled_dim=32, temporal=OPS["attention"], frame_embedding=kind,
    )  # fmt: skip
    randomize_(net)
    t, cond = torch.tensor([3, 700]), {"context": torch.randn(2, 5, 32), "pooled": torch.randn(2, 32)}
    still = torch.randn(2, 1, 1, 8, 8).expand(2, 1, 4, 8, 8)
    out = net(still, t, **cond)
    assert (out[:, :, 1:] - out[:, :, :1]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3
    # An image appended to the clip (VDM's joint batch) is processed as that image alone.
    image = torch.randn(2, 1, 1, 8, 8)
    joint = net(torch.cat([still, image], dim=2), t, **cond, image_frames=torch.tensor([[False] * 4 + [True]] * 2))
    torch.testing.assert_close(joint[:, :, 4:], net(image, t, **cond), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(joint[:, :, :4], out, atol=1e-4, rtol=1e-4)


def test_space_time_attention_reads_other_positions_of_other_frames():
    """What the factorized ops cannot do: frame 0 at one position changes frame 1 at another."""
    torch.manual_seed(0)
    op = OPS["spacetime_attention"](16)
    randomize_(op)
    x = torch.randn(1, 2, 16, 3, 3)
    moved = x.clone()
    moved[0, 0, :, 0, 0] += torch.randn(16)  # frame 0, top-left corner
    before, after = (op(v.flatten(0, 1), 2).view_as(x) for v in (x, moved))
    assert (after[0, 1, :, 2, 2] - before[0, 1, :, 2, 2]).abs().max() > 1e-3  # frame 1, bottom-right
    factorized = OPS["attention"](16)
    randomize_(factorized)
    before, after = (factorized(v.flatten(0, 1), 2).view_as(x) for v in (x, moved))
    torch.testing.assert_close(after[0, 1, :, 2, 2], before[0, 1, :, 2, 2])


def test_space_time_rope_depends_only_on_offsets():
    """Rotary scores: shifting query and key by the same space-time offset keeps the score."""
    from lit_models.nets.temporal import space_time_rope
    from diffusers.models.embeddings import apply_rotary_emb

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 12).expand(1, 1, 4 * 3 * 3, 12), torch.randn(1, 1, 1, 12).expand(1, 1, 4 * 3 * 3, 12)
    rope = space_time_rope(4, 3, 3, 12, theta=100.0, device=torch.device("cpu"))
    scores = (apply_rotary_emb(q, rope)[0, 0] @ apply_rotary_emb(k, rope)[0, 0].T).view(4, 3, 3, 4, 3, 3)
    torch.testing.assert_close(scores[0, 0, 0, 1, 1, 0], scores[2, 1, 2, 3, 2, 2])  # offset (+1 frame, +1 row, -2 cols)
    assert not torch.allclose(scores[0, 0, 0, 1, 1, 0], scores[0, 0, 0, 1, 0, 1])


@pytest.mark.parametrize("name", ["causal_attention"])
def test_causal_op_ignores_later_frames_also_with_image_frames(name):
    torch.manual_seed(0)
    op = OPS[name](16)
    randomize_(op)
    x = torch.randn(2, 6, 16, 3, 3)
    image_frames = torch.tensor([[False] * 5 + [True]] * 2)
    later = x.clone()
    later[:, 3:5] += torch.randn_like(later[:, 3:5])  # video frames 3 and 4
    before = op(x.flatten(0, 1), 6, image_frames).view_as(x)
    after = op(later.flatten(0, 1), 6, image_frames).view_as(x)
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert not torch.allclose(after[:, 3:5], before[:, 3:5])


def test_shift_has_no_parameters_and_moves_channels_one_frame():
    op = TemporalShift(16, fraction=0.25)
    assert sum(p.numel() for p in op.parameters()) == 0
    x = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(1, 3, 16, 1, 1).flatten(0, 1).contiguous()  # frame index
    out = op(x, 3).view(3, 16)
    assert out[:, :4].tolist() == [[0.0] * 4, [0.0] * 4, [1.0] * 4]  # from the previous frame, zero at start
    assert out[:, 4:8].tolist() == [[1.0] * 4, [2.0] * 4, [0.0] * 4]  # from the next frame, zero at end
    assert out[:, 8:].tolist() == [[float(f)] * 8 for f in range(3)]


def tiny_unet(temporal) -> FactorizedUNet:
    return FactorizedUNet(
        channels=(16, 32), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=32, pooled_dim=32, temporal=temporal,
    )  # fmt: skip


def per_frame_by_frame(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return torch.cat([net(x[:, :, f : f + 1], t, **cond) for f in range(x.shape[2])], dim=2)


@pytest.mark.parametrize("inner", ["attention", "shift", "swapped_cross_attention"])
def test_alpha_mixed_layers_start_exactly_at_the_image_model(inner):
    torch.manual_seed(0)
    op = {"attention": OPS["attention"], "shift": TemporalShift, "swapped_cross_attention": OPS["swapped_cross_attention"]}[inner]
    net = tiny_unet(partial(AlphaMixed, op=op))
    alphas = [m.alpha for m in net.modules() if isinstance(m, AlphaMixed)]
    with torch.no_grad():  # a non-trivial image model AND temporal ops that do mix frames
        for name, parameter in net.named_parameters():
            if not name.endswith("alpha"):
                parameter.normal_(0, 0.2)
    x, t = torch.randn(2, 1, 4, 8, 8), torch.tensor([3, 700])
    cond = {"context": torch.randn(2, 5, 32), "pooled": torch.randn(2, 32)}
    image_model = tiny_unet(None)  # the same spatial weights, no temporal layers
    missing, unexpected = image_model.load_state_dict(net.state_dict(), strict=False)
    assert not missing and unexpected and all(".temporal." in k for k in unexpected)
    video = net(x, t, **cond)
    assert video.abs().mean() > 1e-2
    torch.testing.assert_close(video, image_model(x, t, **cond), rtol=0, atol=0)

    with torch.no_grad():
        for alpha in alphas:
            alpha.fill_(0.5)
    assert (net(x, t, **cond) - per_frame_by_frame(net, x, t, cond)).abs().max() > 1e-3


def test_unet_processes_appended_images_as_images_with_their_own_captions():
    """A joint batch (clip + images with per-frame captions) gives the clip's output of the
    clip alone and each image's output of that image alone."""
    torch.manual_seed(0)
    net = tiny_unet(OPS["attention"])
    randomize_(net)
    video, images = torch.randn(2, 1, 4, 8, 8), torch.randn(2, 1, 2, 8, 8)
    t = torch.tensor([30, 600])
    clip_context, clip_pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    image_context, image_pooled = torch.randn(2, 2, 5, 32), torch.randn(2, 2, 32)

    context = torch.cat([clip_context[:, None].expand(2, 4, 5, 32), image_context], dim=1)  # (B, F, L, D)
    pooled = torch.cat([clip_pooled[:, None].expand(2, 4, 32), image_pooled], dim=1)  # (B, F, P)
    image_frames = torch.tensor([[False] * 4 + [True] * 2] * 2)
    joint = net(torch.cat([video, images], dim=2), t, context=context, pooled=pooled, image_frames=image_frames)

    torch.testing.assert_close(joint[:, :, :4], net(video, t, context=clip_context, pooled=clip_pooled), atol=1e-4, rtol=1e-4)
    for i in range(2):
        alone = net(images[:, :, i : i + 1], t, context=image_context[:, i], pooled=image_pooled[:, i])
        torch.testing.assert_close(joint[:, :, 4 + i : 5 + i], alone, atol=1e-4, rtol=1e-4)
