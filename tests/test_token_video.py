"""Mechanism tests of the CogVideo-style token paradigm (lit_models/token_video.py): a per-frame
VQ tokenizer and a causal transformer over a clip's codes, frame-rate classes, and the cogvideo
experiment's config. Tiny tensors and configs."""

from __future__ import annotations

import pytest
import torch


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


@pytest.mark.slow
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


@pytest.mark.slow
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
