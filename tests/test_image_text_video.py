"""Make-A-Video's stages: clip pretraining, t2i on images, video with spatial layers frozen
or at a lower LR; what each stage may change, compared through state dicts."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from lit_models.conditioning import OpenClipEmbedder
from lit_models.image_text_video import ClipPretraining, EmbeddingPrior, ImageTextToVideo, is_temporal_parameter
from lit_models.nets import FactorizedUNet, TemporalConv

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")

TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(width=32, layers=1, heads=4, context_length=12, vocab_size=49408),
)


def tiny_net() -> FactorizedUNet:
    return FactorizedUNet(
        channels=(8, 16), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=16, pooled_dim=16, temporal=partial(TemporalConv, kernel_size=3),
    )  # fmt: skip


def stage(stage: str, **kwargs) -> ImageTextToVideo:
    torch.manual_seed(0)
    return ImageTextToVideo(
        net=tiny_net(), clip=OpenClipEmbedder(**TINY_CLIP), stage=stage, prior=EmbeddingPrior(16, hidden=16),
        noise_scheduler=DDPMScheduler(prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0), video_shape=(1, 4, 16, 16),
        cfg_dropout=0.0, **kwargs,
    )  # fmt: skip


def train_steps(module, batch, steps: int = 3) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = module.configure_optimizers()
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


IMAGES = {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "caption": ["a handwritten 1", "a handwritten 2", "a handwritten 3", "a handwritten 4"]}
VIDEOS = {"video": torch.rand(2, 1, 4, 16, 16) * 2 - 1}


def test_clip_stage_trains_both_towers_contrastively():
    torch.manual_seed(0)
    module = ClipPretraining(OpenClipEmbedder(**TINY_CLIP, trainable=True), partial(torch.optim.AdamW, lr=3e-3))
    changed = train_steps(module, IMAGES, steps=2)
    assert any(k.startswith("clip.model.visual.") for k in changed)
    assert any(k.startswith("clip.model.transformer.") for k in changed)
    assert "clip.model.token_embedding.weight" not in changed  # frozen on purpose (CPU cost)


def test_t2i_stage_trains_spatial_layers_and_prior_but_no_temporal_op(tmp_path):
    module = stage("t2i")
    changed = train_steps(module, IMAGES)
    assert not any(is_temporal_parameter(k[len("net.") :]) for k in changed if k.startswith("net."))
    assert any(k.startswith("net.") for k in changed) and any(k.startswith("prior.") for k in changed)
    assert not any(k.startswith("clip.") for k in changed)


@pytest.mark.parametrize("freeze_spatial", [True, False])
def test_video_stage_starts_from_t2i_and_updates_only_what_it_should(tmp_path, freeze_spatial):
    t2i = stage("t2i")
    train_steps(t2i, IMAGES, steps=1)
    torch.save({"state_dict": t2i.state_dict()}, tmp_path / "t2i.ckpt")

    video = stage("video", init_from=str(tmp_path / "t2i.ckpt"), freeze_spatial=freeze_spatial)
    for key, value in video.state_dict().items():
        if key.startswith(("net.", "prior.")):
            assert torch.equal(value, t2i.state_dict()[key]), key
    changed = train_steps(video, VIDEOS)
    temporal = {k for k in changed if is_temporal_parameter(k)}
    assert temporal, "the temporal layers must train"
    assert not any(k.startswith(("clip.", "prior.")) for k in changed)
    spatial = changed - temporal
    if freeze_spatial:
        assert spatial == set()
    else:  # lower LR, still trained
        assert any(k.startswith("net.") for k in spatial)
        assert video.configure_optimizers().param_groups[1]["lr"] == pytest.approx(1e-3)


def test_inference_conditions_on_text_in_the_shared_space():
    module = stage("t2i")
    videos = module.generate(["a handwritten 3", "a handwritten 7"], steps=2, guidance_scale=2.0)
    assert videos.shape == (2, 1, 4, 16, 16)
    conditioning = module.encode_captions(["a handwritten 3", ""])
    assert conditioning["pooled"][1].abs().sum() == 0  # the unconditional (CFG-dropout) embedding
    torch.testing.assert_close(conditioning["pooled"][0].norm(), torch.tensor(1.0))
