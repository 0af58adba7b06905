"""Cascade: the spatial super-resolution stage (low-res conditioning, noise-conditioning
augmentation) and `effvid-sample pipeline=cascade` chaining base -> temporal SR -> spatial SR;
feature caching through effvid-sample."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from experiments.sample import run_sampling
from experiments.train import run_training
from lit_models.conditioning import OpenClipTextEncoder
from lit_models.feature_cache import sampling_cache
from lit_models.nets import FactorizedUNet, TemporalConv
from lit_models.super_resolution import LowResConditioning, SpatialSuperResolution, resize_frames
from tests.conftest import compose_config, tiny_overrides

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
TEXT = dict(text_cfg=dict(width=16, layers=1, heads=4, context_length=12, vocab_size=49408), embed_dim=16)


def tiny_sr(**kwargs) -> SpatialSuperResolution:
    torch.manual_seed(0)
    net = FactorizedUNet(in_channels=2, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                         temporal_levels=(True, True), context_dim=16, pooled_dim=16, temporal=TemporalConv)
    return SpatialSuperResolution(
        net=net, text_encoder=OpenClipTextEncoder(**TEXT, trainable=True), noise_scheduler=DDPMScheduler(prediction_type="v_prediction"),
        optimizer=partial(torch.optim.AdamW, lr=3e-3), video_shape=(1, 4, 16, 16), sample_steps=2, **kwargs,
    )  # fmt: skip


def randomise_zero_layers(net: torch.nn.Module) -> None:
    """The U-Net's zero-initialised output layer would make every input give zero."""
    for parameter in net.parameters():
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.1)


def test_low_res_input_reaches_the_net_and_the_level_embedding_starts_at_zero():
    model = tiny_sr()
    wrapper: LowResConditioning = model.net
    randomise_zero_layers(wrapper.net)
    x, low = torch.randn(2, 1, 4, 16, 16), torch.randn(2, 1, 4, 8, 8)
    text = model.encode_captions(["a handwritten 1 moving up", "a handwritten 2 moving left"])
    out = wrapper(x, torch.tensor([10, 500]), low_res=low, aug_level=torch.tensor([0, 250]), **text)
    plain = wrapper.net(torch.cat([x, resize_frames(low, (16, 16))], dim=1), torch.tensor([10, 500]), **text)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # a fresh level embedding adds exactly zero
    moved = wrapper(x, torch.tensor([10, 500]), low_res=low.flip(-1), aug_level=torch.tensor([0, 250]), **text)
    assert (moved - out).abs().amax() > 1e-3  # the low-res clip changes the prediction


def test_noise_conditioning_augmentation_noises_by_level_and_leaves_level_zero_clean():
    model = tiny_sr()
    low = torch.rand(3, 1, 4, 8, 8) * 2 - 1
    augmented = model.inputs.augment(low, torch.tensor([0, 100, 900]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(augmented[0], low[0], rtol=0, atol=0)
    errors = [(augmented[i] - low[i]).pow(2).mean().item() for i in (1, 2)]
    assert 0 < errors[0] < errors[1]  # more noise at the higher level
    batch = {"video": torch.rand(4, 1, 4, 16, 16) * 2 - 1, "caption": ["a handwritten 3 moving up"] * 4}
    conditioning = model.condition(batch, drop=False)
    assert conditioning["low_res"].shape == (4, 1, 4, 8, 8)
    assert conditioning["aug_level"].min() >= 0 and conditioning["aug_level"].max() <= model.inputs.max_aug_level


@pytest.mark.slow
def test_super_resolution_stage_learns_to_use_the_low_res_clip():
    model = tiny_sr(max_aug_level=0)
    videos = resize_frames(torch.rand(2, 1, 4, 8, 8) * 2 - 1, (16, 16))  # smooth: the low-res clip determines it
    batch = {"video": videos, "caption": ["a handwritten 4 moving up"] * 2}  # same caption: only low-res tells them apart
    optimizer = model.configure_optimizers()
    model.log = lambda *args, **kwargs: None

    def loss_with(conditioning):  # at fixed noise and timesteps
        return sum(model.diffusion_loss(videos, conditioning, torch.Generator().manual_seed(seed)).mean().item()
                   for seed in range(4))

    with torch.no_grad():
        before = loss_with(model.condition(batch, drop=False))
    for _ in range(50):
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()

    with torch.no_grad():
        right = model.condition(batch, drop=False)
        swapped = {**right, "low_res": right["low_res"].flip(0)}  # each clip given the other's low-res
        assert loss_with(right) < 0.5 * before
        assert loss_with(right) < 0.7 * loss_with(swapped)


@pytest.mark.slow
def test_cascade_pipeline_doubles_frames_then_resolution(tmp_path, digits_data_root):
    runs = tmp_path / "runs"
    common = [*tiny_overrides(digits_data_root, runs, max_steps=2), "~logger", "trainer.limit_val_batches=0"]
    run_training(compose_config([*common, "run_id=base"]))
    run_training(compose_config([*common, "run_id=tsr", "experiment=lvdm"]))
    run_training(compose_config([*common, "run_id=ssr", "experiment=spatial_sr_digits", "data.batch_size=2"]))
    cfg = compose_config([
        f"runs_dir={runs}", "run=base", "prompts=[a handwritten 5 moving up]", "pipeline=cascade",
        "temporal_sr=tsr", "spatial_sr=ssr", "steps=2", f"out={tmp_path / 'out'}", "cache=2",
    ], "sample")  # fmt: skip
    result = run_sampling(cfg)
    base, temporal, spatial = (result["stages"][k] for k in ("base", "temporal_sr", "spatial_sr"))
    assert base.shape == (1, 1, 8, 16, 16) and temporal.shape == (1, 1, 15, 16, 16) and spatial.shape == (1, 1, 15, 32, 32)
    torch.testing.assert_close(temporal[:, :, ::2], base)  # interpolation keeps the base frames
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1

    bad = compose_config([f"runs_dir={runs}", "run=base", "pipeline=cascade", "spatial_sr=tsr",
                          "prompts=[a handwritten 5 moving up]", "steps=2"], "sample")
    with pytest.raises(Exception, match="spatial_sr=tsr: its paradigm FrameConditionedTextToVideo cannot upsample"):
        run_sampling(bad)


def test_sampling_cache_interval_one_is_exact_and_wrong_kind_is_named():
    model = tiny_sr()
    randomise_zero_layers(model.net.net)
    low = torch.rand(1, 1, 4, 8, 8) * 2 - 1
    plain = model.upsample(["a handwritten 6 moving up"], low, steps=3, seed=1)
    with sampling_cache(model, 1):
        torch.testing.assert_close(model.upsample(["a handwritten 6 moving up"], low, steps=3, seed=1), plain, rtol=0, atol=0)
    with sampling_cache(model, 2):  # DeepCache finds the U-Net inside the low-res wrapper
        cached = model.upsample(["a handwritten 6 moving up"], low, steps=3, seed=1)
    assert cached.shape == plain.shape and not torch.equal(cached, plain)
    assert isinstance(model.net, LowResConditioning) and isinstance(model.net.net, FactorizedUNet)  # restored
    with pytest.raises(ValueError, match="needs a diffusers transformer backbone"):
        with sampling_cache(model, "first_block"):
            pass


def test_super_resolution_generate_upsamples_the_given_low_res_clip():
    model = tiny_sr()
    randomise_zero_layers(model.net.net)
    prompts = ["a handwritten 6 moving up", "a handwritten 2 moving left"]
    low = torch.rand(2, 1, 4, 8, 8) * 2 - 1
    videos = model.generate(prompts, steps=2, seed=3, low_res=low)
    assert videos.shape == (2, 1, 4, 16, 16)  # scale_factor 2, whatever video_shape says
    torch.testing.assert_close(videos, model.upsample(prompts, low, steps=2, seed=3), rtol=0, atol=0)
    assert not torch.allclose(model.generate(prompts, steps=2, seed=3, low_res=low.flip(0)), videos)  # it follows the clip
    with pytest.raises(TypeError, match="low_res"):
        model.generate(prompts, steps=2)
