"""Latent space: the per-frame AutoencoderKL, its digits training, and text-to-video
diffusing in its latents."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from lit_models.conditioning import OpenClipTextEncoder
from lit_models.latent import AutoencoderTraining, FrameAutoencoder
from lit_models.nets import FactorizedUNet, TemporalConv
from lit_models.text_to_video import TextToVideo

TINY_VAE = dict(in_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def test_vae_training_checkpoint_loads_into_a_frozen_frame_autoencoder(tmp_path):
    torch.manual_seed(0)
    training = AutoencoderTraining(FrameAutoencoder(**TINY_VAE, trainable=True), partial(torch.optim.Adam, lr=1e-2))
    batch = {"video": torch.rand(2, 1, 3, 16, 16) * 2 - 1}
    optimizer = training.configure_optimizers()
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        loss = training.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    torch.save({"state_dict": training.state_dict()}, tmp_path / "vae.ckpt")

    frozen = FrameAutoencoder(**TINY_VAE, weights=str(tmp_path / "vae.ckpt"))
    assert not any(p.requires_grad for p in frozen.parameters())
    latents = frozen.encode(batch["video"])
    assert latents.shape == (2, 4, 3, 8, 8) == frozen.latent_shape(batch["video"].shape)
    torch.testing.assert_close(latents, training.autoencoder.encode(batch["video"]).detach())
    assert frozen.decode(latents).shape == batch["video"].shape
    with pytest.raises(ValueError, match="no autoencoder.vae"):
        torch.save({"state_dict": {"net.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
        FrameAutoencoder(**TINY_VAE, weights=str(tmp_path / "other.ckpt"))


def test_text_to_video_diffuses_in_latents_and_samples_pixels():
    torch.manual_seed(0)
    vae = FrameAutoencoder(**TINY_VAE)
    net = FactorizedUNet(
        in_channels=4, channels=(8, 16), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=16, pooled_dim=16, temporal=TemporalConv,
    )  # fmt: skip
    module = TextToVideo(
        net=net, text_encoder=OpenClipTextEncoder(text_cfg=dict(width=16, layers=1, heads=4, context_length=12, vocab_size=49408), embed_dim=16),
        noise_scheduler=DDPMScheduler(prediction_type="v_prediction"), optimizer=partial(torch.optim.AdamW, lr=1e-3),
        video_shape=(1, 3, 16, 16), sample_steps=2, autoencoder=vae,
    )  # fmt: skip
    seen = []
    module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    batch = {"video": torch.rand(2, 1, 3, 16, 16) * 2 - 1, "caption": ["a handwritten 1 moving up", ""]}
    assert module.training_step(batch, 0).isfinite()
    assert seen[-1] == (2, 4, 3, 8, 8)  # the net sees latents
    videos = module.generate(["a handwritten 3 moving up"], guidance_scale=1.0)
    assert videos.shape == (1, 1, 3, 16, 16) and seen[-1] == (1, 4, 3, 8, 8)


def latent_net() -> FactorizedUNet:
    return FactorizedUNet(in_channels=4, channels=(8, 16), attention_levels=(False, True), temporal_levels=(True, True),
                          context_dim=16, pooled_dim=16, temporal=TemporalConv)  # fmt: skip


TEXT = dict(text_cfg=dict(width=16, layers=1, heads=4, context_length=12, vocab_size=49408), embed_dim=16)


def test_encoded_clips_are_cached_apart_from_shard_latents_and_shard_latents_win():
    from lit_models.diffusion import ENCODED_CACHE, SHARD_LATENTS

    torch.manual_seed(0)
    module = TextToVideo(net=latent_net(), text_encoder=OpenClipTextEncoder(**TEXT), autoencoder=FrameAutoencoder(**TINY_VAE),
                         noise_scheduler=DDPMScheduler(), optimizer=partial(torch.optim.AdamW, lr=1e-3), video_shape=(1, 3, 16, 16))  # fmt: skip
    batch = {"video": torch.rand(2, 1, 3, 16, 16) * 2 - 1, "caption": ["a handwritten 1 moving up"] * 2}
    encoded = module.clean_data(batch)
    assert SHARD_LATENTS not in batch  # a later reader must not take this for an encoded shard's latents
    assert module.clean_data(batch) is encoded is batch[ENCODED_CACHE]["video"]  # the VAE ran once
    torch.testing.assert_close(encoded, module.autoencoder.encode(batch["video"]))
    shard = {**batch, SHARD_LATENTS: torch.zeros(2, 4, 3, 8, 8)}
    assert module.clean_data(shard) is shard[SHARD_LATENTS]


def test_dpo_encodes_winner_and_loser_the_same_way_in_both_objectives():
    from lit_models.diffusion import ENCODED_CACHE
    from lit_models.lora import LoRA
    from lit_models.preference import DiffusionDPO

    pair = {"win": torch.rand(2, 1, 3, 16, 16) * 2 - 1, "lose": torch.rand(2, 1, 3, 16, 16) * 2 - 1,
            "caption": ["a handwritten 3 moving up", "a handwritten 7 moving left"]}  # fmt: skip
    for objective in ("dpo", "sft"):
        torch.manual_seed(0)
        module = DiffusionDPO(net=latent_net(), text_encoder=OpenClipTextEncoder(**TEXT), autoencoder=FrameAutoencoder(**TINY_VAE),
                              trainable=[LoRA(rank=2, alpha=2)], objective=objective, noise_scheduler=DDPMScheduler(),
                              optimizer=partial(torch.optim.AdamW, lr=1e-3), video_shape=(1, 3, 16, 16))  # fmt: skip
        seen = []
        module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
        batch = dict(pair)
        assert torch.isfinite(module._step(batch, "train", torch.Generator().manual_seed(0)))
        encoded = {"win", "lose"} if objective == "dpo" else {"win"}  # SFT trains on the winners alone
        assert set(batch[ENCODED_CACHE]) == encoded
        for key in encoded:
            torch.testing.assert_close(batch[ENCODED_CACHE][key], module.autoencoder.encode(pair[key]))
        assert all(shape[1:] == (4, 3, 8, 8) for shape in seen)  # the net sees latents in both objectives
