"""Image shards (img2dataset layout), the joint image/video mixer and the VDM paradigm."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import DDPMScheduler
from PIL import Image

from datamodules.image_shards import ImageShardDataModule
from datamodules.joint_image_video import JointImageVideoDataModule, MixedBatches
from datamodules.video_shards import SkippedSampleWarning
from lit_models.conditioning import OpenClipTextEncoder
from lit_models.joint_image_video import JointImageVideo
from lit_models.nets import FactorizedUNet, TemporalAttention


def encoded(fmt: str, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """Two shards as img2dataset writes them, with a failed download and a corrupt jpg."""
    root = tmp_path_factory.mktemp("image_shards")
    entries = [
        {"__key__": "000000", "jpg": encoded("JPEG", 255), "txt": b"a white square", "json": b'{"status": "success"}'},
        {"__key__": "000001", "json": b'{"status": "failed_to_download", "error_message": "404"}'},
        {"__key__": "000002", "png": encoded("PNG", 0), "txt": b"a black square", "json": b"{}"},
        {"__key__": "000003", "jpg": b"not a jpeg", "txt": b"broken", "json": b"{}"},
        {"__key__": "000004", "jpg": encoded("JPEG", 128), "txt": b"a grey square", "json": b"{}"},
    ]
    for index, chunk in enumerate((entries[:3], entries[3:])):
        with wds.TarWriter(str(root / f"shard-{index:06d}.tar")) as writer:
            for entry in chunk:
                writer.write(entry)
    return root


def test_image_shards_yield_images_and_skip_failed_entries(image_shards):
    datamodule = ImageShardDataModule(image_shards, val_shards=image_shards, batch_size=2, val_batch_size=8, num_workers=0, size=16, channels=3)
    datamodule.setup("fit")
    with pytest.warns(SkippedSampleWarning) as caught:
        batches = list(datamodule.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["key"] == ["000000", "000002", "000004"]
    assert batch["caption"] == ["a white square", "a black square", "a grey square"]
    means = batch["image"].mean(dim=(1, 2, 3))
    assert means[0] > 0.95 and means[1] < -0.95 and abs(means[2]) < 0.05  # pixels scaled to [-1, 1]
    assert datamodule.num_skipped_samples == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "000001" in messages and "failed_to_download" in messages and "000003" in messages


def fake_loader(kind: str, batches: int = 1000, size: int = 4):
    shape = (1, 2, 4, 4) if kind == "video" else (1, 4, 4)
    return [
        {kind: torch.full((size, *shape), float(i)), "caption": [f"{kind} {i}"] * size, "key": [f"{i}"] * size}
        for i in range(batches)
    ]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_mixer_yields_the_configured_image_ratio_reproducibly(ratio):
    def draw(seed: int) -> list[dict]:
        mixed = iter(MixedBatches(fake_loader("video"), fake_loader("image"), ratio, batch_size=20, seed=seed))
        return [next(mixed) for _ in range(50)]  # 1,000 samples

    batches = draw(seed=0)
    images = sum(b["image"].shape[0] for b in batches)
    assert images + sum(b["video"].shape[0] for b in batches) == 1000
    assert abs(images / 1000 - ratio) < 0.03
    assert all(b["video"].shape[1:] == (1, 2, 4, 4) and b["image"].shape[1:] == (1, 4, 4) for b in batches)
    assert [b["image"].shape[0] for b in draw(seed=0)] == [b["image"].shape[0] for b in batches]
    assert [b["image"].shape[0] for b in draw(seed=1)] != [b["image"].shape[0] for b in batches]


def test_joint_datamodule_mixes_digit_clips_and_images(digits_data_root, image_shards):
    from datamodules import VideoShardDataModule

    video = VideoShardDataModule(digits_data_root / "digits/shards/train", batch_size=4, num_workers=0, num_frames=4, size=16, channels=3)
    images = ImageShardDataModule(image_shards, batch_size=2, num_workers=0, size=16, channels=3)
    datamodule = JointImageVideoDataModule(video, images, image_ratio=0.5, batch_size=6)
    datamodule.setup("fit")
    with pytest.warns(SkippedSampleWarning):
        batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape[0] + batch["image"].shape[0] == 6
    assert batch["video"].shape[1:] == (3, 4, 16, 16) and batch["image"].shape[1:] == (3, 16, 16)
    assert len(batch["image_caption"]) == batch["image"].shape[0]


def tiny_joint() -> JointImageVideo:
    torch.manual_seed(0)
    net = FactorizedUNet(
        channels=(8, 16), attention_levels=(False, True), temporal_levels=(True, True),
        context_dim=16, pooled_dim=16, temporal=partial(TemporalAttention, heads=4),
    )  # fmt: skip
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.2)  # temporal ops included: they must actually mix
    encoder = OpenClipTextEncoder(text_cfg=dict(width=16, layers=1, heads=4, context_length=12, vocab_size=49408), embed_dim=16)
    return JointImageVideo(
        net=net, text_encoder=encoder, noise_scheduler=DDPMScheduler(prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), cfg_dropout=0.0, image_loss_weight=0.5,
    )  # fmt: skip


def mixed_batch(clips: int, images: int) -> dict:
    return {
        "video": torch.rand(clips, 1, 4, 8, 8) * 2 - 1,
        "caption": [f"a handwritten {i} moving up" for i in range(clips)],
        "image": torch.rand(images, 1, 8, 8) * 2 - 1,
        "image_caption": [f"a handwritten {i}" for i in range(images)],
    }


def test_joint_batch_appends_images_to_clips_with_filler_weighted_zero():
    module = tiny_joint()
    batch = mixed_batch(clips=2, images=3)
    x0, image_frames, weights, captions = module.objective.arrange(batch)
    assert x0.shape == (2, 1, 6, 8, 8)  # 4 frames + ceil(3 / 2) images per clip
    assert image_frames.tolist() == [[False] * 4 + [True] * 2] * 2
    assert weights[:, 4:].tolist() == [[1.0, 1.0], [1.0, 0.0]]  # the 4th image slot repeats image 0
    torch.testing.assert_close(x0[1, :, 4], batch["image"][2])
    assert captions[1] == ["a handwritten 1 moving up"] * 4 + ["a handwritten 2", "a handwritten 0"]


def test_joint_batch_without_images_is_the_clips_alone():
    # With image_ratio 0.25 and 20 samples, 0.3 % of batches hold no image: one in a run.
    module = tiny_joint()
    batch = mixed_batch(clips=3, images=0)
    x0, image_frames, weights, captions = module.objective.arrange(batch)
    torch.testing.assert_close(x0, batch["video"])
    assert not image_frames.any() and weights.eq(1).all()
    assert captions[2] == ["a handwritten 2 moving up"] * 4
    losses = module.objective.joint_loss(module, batch, drop=False)
    assert "image" not in losses and torch.isfinite(losses["loss"])


def test_image_loss_trains_spatial_layers_only_and_weights_combine():
    module = tiny_joint()
    batch = mixed_batch(clips=2, images=4)
    losses = module.objective.joint_loss(module, batch, drop=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["loss"], losses["video"] + 0.5 * losses["image"])

    module.zero_grad()
    losses["image"].backward()
    temporal = [p.grad for n, p in module.net.named_parameters() if ".temporal." in n]
    spatial = [p.grad for n, p in module.net.named_parameters() if ".temporal." not in n]
    assert all(g is None or g.abs().max() == 0 for g in temporal)  # images never pass through them
    assert any(g is not None and g.abs().max() > 0 for g in spatial)

    only_images = module.objective.joint_loss(module, mixed_batch(clips=0, images=3), drop=True)
    assert "video" not in only_images and only_images["loss"] > 0


def test_caption_dropout_drops_whole_clips_as_sampling_uncondition_does():
    # Sampling's unconditional pass gives every frame of a clip the empty caption; dropping
    # frames one by one would leave that input untrained and mix captioned and empty frames.
    module = tiny_joint()
    module.cfg_dropout = 0.5
    batch = mixed_batch(clips=64, images=128)
    _, image_frames, _, captions = module.objective.arrange(batch)  # 4 clip frames + 2 images per row
    torch.manual_seed(0)
    pooled = module.objective.frame_conditioning(module, captions, image_frames, drop=True)["pooled"]  # (64, 6, P)
    empty = module.encode_captions([""])["pooled"][0]
    dropped = (pooled - empty).abs().amax(dim=-1) < 1e-6  # (64, 6)
    clip_frames, image_slots = dropped[:, :4], dropped[:, 4:]
    assert (clip_frames == clip_frames[:, :1]).all()  # a clip keeps or drops its caption as a whole
    assert 10 < int(clip_frames[:, 0].sum()) < 54  # ~half the clips dropped
    assert (image_slots[:, 0] != image_slots[:, 1]).any()  # images are independent samples
    assert (image_slots != clip_frames[:, :2]).any()


@pytest.mark.parametrize("schedule", ["ddpm_shared_noise", "flow_matching"])
def test_joint_frame_losses_follow_the_modules_forward_process(schedule):
    # The joint loss must train on the module's own timesteps, noise and target: a clip-only
    # arrangement's per-frame losses average to the clip-only loss (VideoFusion noise, flow).
    from diffusers import FlowMatchEulerDiscreteScheduler

    module = tiny_joint()
    if schedule == "flow_matching":
        module.noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        module.shared_noise_ratio = 0.5
    batch = mixed_batch(clips=3, images=0)
    x0, image_frames, _, captions = module.objective.arrange(batch)
    conditioning = module.objective.frame_conditioning(module, captions, image_frames, drop=False)
    frame_losses = module.objective.frame_losses(module, x0, conditioning, torch.Generator().manual_seed(3))
    clip_losses = module.diffusion_loss(x0, module.condition(batch, drop=False), torch.Generator().manual_seed(3))
    torch.testing.assert_close(frame_losses.mean(dim=1), clip_losses)


def test_joint_batches_reach_the_device_through_the_video_datamodules_move(tmp_path):
    from datamodules import VideoShardDataModule

    video = VideoShardDataModule(tmp_path / "clips", num_workers=0)
    datamodule = JointImageVideoDataModule(video, ImageShardDataModule(tmp_path / "images", num_workers=0))
    batch = {"video": torch.zeros(1, 3, 2, 4, 4), "image": torch.zeros(1, 3, 4, 4), "image_caption": ["a"]}
    assert datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch  # already there
    moved = datamodule.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["video"].is_meta and moved["image"].is_meta and moved["image_caption"] == ["a"]
