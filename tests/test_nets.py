"""FactorizedUNet, the temporal ops and the open_clip text encoder."""

from __future__ import annotations

from functools import partial

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_models.conditioning import OpenClipEmbedder, OpenClipTextEncoder
from lit_models.nets import FactorizedUNet, TemporalAttention, TemporalConv

TINY_TEXT = dict(width=32, layers=1, heads=4, context_length=12, vocab_size=49408)
TEMPORAL_OPS = [partial(TemporalAttention, heads=4), TemporalConv, partial(TemporalAttention, causal=True)]


def tiny_unet(**overrides) -> FactorizedUNet:
    config = dict(
        channels=(16, 32),
        attention_levels=(False, True),
        temporal_levels=(True, True),
        context_dim=32,
        pooled_dim=32,
        temporal=TemporalAttention,
    )
    return FactorizedUNet(**(config | overrides))


def randomize_(module: nn.Module) -> None:
    """Give every parameter random values (zero-initialised ones included)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.2)


def randomize_spatial_(net: FactorizedUNet) -> None:
    """Random weights everywhere except the temporal ops, which stay at their init."""
    temporal = {id(p) for m in net.modules() if isinstance(m, (TemporalAttention, TemporalConv)) for p in m.parameters()}
    with torch.no_grad():
        for parameter in net.parameters():
            if id(parameter) not in temporal:
                parameter.normal_(0, 0.2)


def conditioning(batch_size: int, length: int = 5, dim: int = 32) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch_size, length, dtype=torch.bool)
    mask[:, 3:] = False
    return {"context": torch.randn(batch_size, length, dim), "pooled": torch.randn(batch_size, dim), "context_mask": mask}


@pytest.mark.parametrize(
    "kwargs, shape, out_channels",
    [
        ({}, (2, 1, 8, 16, 16), 1),  # the quickstart defaults with TemporalAttention
        (dict(temporal=TemporalConv, blocks_per_level=2), (2, 1, 4, 16, 16), 1),
        (dict(temporal=None, context_dim=None, pooled_dim=None), (2, 1, 4, 16, 16), 1),
        (dict(in_channels=3, out_channels=6, channels=(16, 32), attention_levels=(0, 1), temporal_levels=(1, 1)), (1, 3, 3, 32, 32), 6),
        ({}, (2, 1, 1, 16, 16), 1),  # images
    ],
)
def test_unet_output_shape(kwargs, shape, out_channels):
    kwargs = {"temporal": TemporalAttention, **kwargs}
    net = FactorizedUNet(**kwargs)
    randomize_(net)
    cond = conditioning(shape[0], dim=64) if kwargs.get("context_dim", 64) else {}
    out = net(torch.randn(shape), torch.tensor([10, 500][: shape[0]]), **cond)
    batch, _, frames, height, width = shape
    assert out.shape == (batch, out_channels, frames, height, width)
    assert torch.isfinite(out).all()


def test_unet_rejects_sizes_it_cannot_downsample():
    with pytest.raises(ValueError, match="divisible by 4"):
        FactorizedUNet()(torch.randn(1, 1, 2, 18, 18), torch.tensor([1]), **conditioning(1, dim=64))


@pytest.mark.parametrize("temporal", TEMPORAL_OPS)
def test_video_equals_frame_by_frame_at_init_and_not_after_training_temporal(temporal):
    torch.manual_seed(0)
    net = tiny_unet(temporal=temporal)
    randomize_spatial_(net)  # a non-trivial image model; temporal ops still at their init
    x, t, cond = torch.randn(2, 1, 4, 8, 8), torch.tensor([3, 700]), conditioning(2)

    video = net(x, t, **cond)
    frame_by_frame = torch.cat([net(x[:, :, f : f + 1], t, **cond) for f in range(4)], dim=2)
    assert video.abs().mean() > 1e-2  # the comparison is not between zeros
    torch.testing.assert_close(video, frame_by_frame, atol=1e-5, rtol=1e-4)

    randomize_(net)  # now the temporal ops mix frames
    video = net(x, t, **cond)
    frame_by_frame = torch.cat([net(x[:, :, f : f + 1], t, **cond) for f in range(4)], dim=2)
    assert (video - frame_by_frame).abs().max() > 1e-3


@pytest.mark.parametrize("temporal", TEMPORAL_OPS)
def test_temporal_op_is_identity_for_one_frame(temporal):
    op = temporal(16)
    randomize_(op)
    x = torch.randn(6, 16, 4, 4)  # six images
    assert torch.equal(op(x, num_frames=1), x)
    assert not torch.allclose(op(x, num_frames=3), x)  # two clips of three frames do change


def test_causal_temporal_attention_ignores_future_frames():
    torch.manual_seed(0)
    frames = 6
    causal, full = TemporalAttention(16, causal=True), TemporalAttention(16)
    randomize_(causal)
    full.load_state_dict(causal.state_dict())
    x = torch.randn(2 * frames, 16, 3, 3)  # (B*F, C, H, W)
    changed = x.clone().view(2, frames, 16, 3, 3)
    changed[:, 4:] += torch.randn_like(changed[:, 4:])  # frames 4 and 5 of both clips
    changed = changed.view_as(x)

    before = causal(x, frames).view(2, frames, 16, 3, 3)
    after = causal(changed, frames).view(2, frames, 16, 3, 3)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert not torch.allclose(after[:, 4:], before[:, 4:])
    # without the flag the same weights do look ahead
    assert not torch.allclose(full(changed, frames).view_as(after)[:, :4], full(x, frames).view_as(before)[:, :4])


@pytest.mark.slow
def test_unet_and_text_encoder_overfit_a_fixed_batch():
    torch.manual_seed(0)
    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=32, trainable=True)
    net = tiny_unet()
    x0 = torch.rand(4, 1, 4, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    x_t = 0.6 * x0 + 0.8 * noise
    timesteps = torch.tensor([100, 300, 500, 700])
    captions = ["a handwritten 1 moving up", "a handwritten 2 moving down", "a handwritten 3 moving left", ""]
    optimizer = torch.optim.Adam([*net.parameters(), *encoder.parameters()], lr=3e-3)

    losses = []
    for _ in range(100):
        text = encoder.encode(captions)
        prediction = net(x_t, timesteps, context=text.tokens, pooled=text.pooled, context_mask=text.mask)
        loss = nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert encoder.text.token_embedding.weight.grad is not None  # the tower trained with the net


def test_text_encoder_tokenizes_offline_and_embeds_captions():
    torch.manual_seed(0)
    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=24, trainable=True)
    assert (encoder.token_dim, encoder.pooled_dim) == (32, 24)
    captions = ["a handwritten 7 moving up-left", "a handwritten 1 moving down", "a handwritten 7 moving up-left", ""]
    tokens = encoder.tokenize(captions)
    assert tokens.shape == (4, 12) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all()  # start of text from the bundled BPE vocabulary
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])

    embedding = encoder(tokens)
    assert embedding.tokens.shape == (4, 12, 32) and embedding.pooled.shape == (4, 24)
    assert embedding.mask.tolist()[3] == [True, True] + [False] * 10  # "" is start + end
    assert embedding.mask[0].sum() == (tokens[0] != 0).sum()
    torch.testing.assert_close(embedding.pooled[0], embedding.pooled[2])
    assert not torch.allclose(embedding.pooled[0], embedding.pooled[1], atol=1e-4)
    assert embedding.pooled.requires_grad


def test_text_encoder_token_cache_gives_the_tokenizers_ids(monkeypatch):
    monkeypatch.setattr("lit_models.conditioning.TOKEN_CACHE_SIZE", 3)  # small enough to overflow below
    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=24, trainable=True)
    batches = [["a handwritten 7 moving up", "a handwritten 1 moving down", "a handwritten 7 moving up"],
               ["a handwritten 1 moving down", "a handwritten 2 moving left"],
               ["a handwritten 3 moving right", "a handwritten 4 moving up-left", "a handwritten 7 moving up"], []]
    # The Make-A-Video stages' CLIP shares the cache: its text embeddings stay those of the tokenizer's ids.
    embedder = OpenClipEmbedder(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1,
                                                              head_width=16), text_cfg=TINY_TEXT)
    for captions in batches:
        assert torch.equal(encoder.tokenize(captions), encoder.tokenizer(captions))
        assert len(encoder._token_ids) <= 3
        if captions:
            plain = F.normalize(embedder.model.encode_text(embedder.tokenizer(captions)), dim=-1)
            assert torch.equal(embedder.encode_text(captions), plain) and len(embedder._token_ids) <= 3


def test_frozen_text_encoder_stays_frozen_and_in_eval():
    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT | {"layers": 1}, embed_dim=16, trainable=False)
    holder = nn.ModuleDict({"text": encoder})
    holder.train()  # what Lightning does at the start of every epoch
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.encode(["a handwritten 3 moving right"]).pooled.requires_grad


def test_caption_projection_starts_as_the_frozen_tower_and_is_all_that_trains(tmp_path):
    torch.manual_seed(0)
    plain = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=16, trainable=False)
    torch.save({"state_dict": {f"text_encoder.{k}": v for k, v in plain.state_dict().items()}}, tmp_path / "tower.ckpt")
    torch.manual_seed(1)  # another random tower, replaced by the checkpoint's
    projected = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=16, trainable=False, caption_projection=True,
                                    weights=str(tmp_path / "tower.ckpt"))
    captions = ["a handwritten 7 moving up-left", "a handwritten 1 moving down"]
    with torch.no_grad():
        before, after = plain.encode(captions), projected.encode(captions)
    torch.testing.assert_close(after.tokens, before.tokens, rtol=0, atol=0)
    torch.testing.assert_close(after.pooled, before.pooled, rtol=0, atol=0)

    nn.ModuleDict({"text": projected}).train()
    assert not projected.text.training and projected.token_projection.training
    embedding = projected.encode(captions)
    (embedding.tokens.sum() + embedding.pooled.sum()).backward()
    trained = {n for n, p in projected.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("token_projection.", "pooled_projection.")) for n in trained)


def test_text_tower_weights_of_another_width_name_the_file(tmp_path):
    # A caption-clip run with another tower width: torch's size-mismatch RuntimeError must
    # come back as a ValueError saying which weights file does not fit.
    wider = OpenClipTextEncoder(text_cfg=TINY_TEXT | {"width": 48}, embed_dim=16, trainable=False)
    torch.save({"state_dict": {f"text_encoder.{k}": v for k, v in wider.state_dict().items()}}, tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match=r"(?s)wide\.ckpt.*size mismatch"):
        OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=16, weights=str(tmp_path / "wide.ckpt"))


def test_text_encoder_lr_scale_gives_the_tower_its_own_learning_rate():
    from lit_models.text_to_video import TextToVideo

    encoder = OpenClipTextEncoder(text_cfg=TINY_TEXT, embed_dim=32, trainable=True, freeze_token_embedding=True)
    from diffusers import DDPMScheduler

    model = TextToVideo(net=tiny_unet(), text_encoder=encoder, text_encoder_lr_scale=0.1, noise_scheduler=DDPMScheduler(),
                        optimizer=partial(torch.optim.AdamW, lr=2e-3))
    groups = model.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [2e-3, pytest.approx(2e-4)]
    text = {id(p) for p in encoder.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == text
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # nothing trained twice or left out


def test_text_encoder_loads_the_text_tower_of_a_named_pretrained_model(monkeypatch):
    """The `pretrained` path, with open_clip's download replaced by a random CLIP."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    calls = []

    def fake_create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        return clip

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    encoder = OpenClipTextEncoder("ViT-S-32-alt", pretrained="some-tag")
    assert calls == [("ViT-S-32-alt", "some-tag")]
    tokens = encoder.tokenize(["a handwritten 4 moving down-right"])
    assert tokens.shape == (1, 77)
    torch.testing.assert_close(encoder(tokens).pooled, clip.encode_text(tokens).detach())
