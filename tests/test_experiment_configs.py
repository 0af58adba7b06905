"""Every experiment config composes with Hydra's compose API; the survey systems' configs
build a model that runs a forward pass when shrunk to test size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "experiments/conf/experiment").glob("*.yaml"))
SYSTEMS = ["vdm", "make_a_video", "magicvideo", "videofactory", "modelscope", "latent_shift", "video_ldm", "lvdm"]
# Placeholders the user fills in (earlier stages' checkpoints); any path composes.
REQUIRED = {
    "make_a_video": ["paradigm.clip.weights=CLIP.ckpt", "paradigm.init_from=T2I.ckpt"],
    "make_a_video_t2i": ["paradigm.clip.weights=CLIP.ckpt"],
    **{name: ["pretrained=PIPELINE_DIR"] for name in (
        "animatediff_sd15", "cogvideox_lora", "ltx_video_lora", "wan_t2v_lora", "modelscope_t2v", "finetune_pretrained",
        "hunyuan_video_lora",
        "progressive_distill_pretrained")},
    "dpo_pretrained": ["pretrained=PIPELINE_DIR", "pairs_dir=PAIRS_DIR"],
    "animatediff_motionlora": ["pretrained=SD_DIR", "bundle.motion_adapter=MOTION_ADAPTER_DIR"],
}


def compose_experiment(name: str, overrides: list[str] = ()) -> object:
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("train", [f"experiment={name}", "run_id=test", *REQUIRED.get(name, []), *overrides])


def test_every_survey_system_has_an_experiment_config():
    assert set(SYSTEMS) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_resolves(name):
    cfg = compose_experiment(name)
    assert cfg.experiment_name == name
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["paradigm"]["_target_"]


@pytest.mark.parametrize("name", ["vdm", "magicvideo", "videofactory", "latent_shift", "video_ldm", "lvdm", "modelscope"])
def test_tiny_system_builds_and_denoises(name):
    overrides = ["debug=tiny"]  # experiments/conf/debug/tiny.yaml: the quickstart's U-Net and text tower
    if name == "modelscope":  # diffusers' UNet3DConditionModel: sized by model.config, no `channels`
        overrides += ["~model.channels", "model.config.block_out_channels=[8,16,16]"]
    cfg = compose_experiment(name, overrides)
    torch.manual_seed(0)
    module = instantiate(cfg.paradigm, net=instantiate(cfg.model))
    channels = cfg.data.video.channels if "video" in cfg.data else cfg.data.channels
    x = torch.randn(2, channels, 4, 16, 16)
    conditioning = module.encode_captions(["a handwritten 3 moving up", ""])
    out = module.net(x, torch.tensor([10, 900]), **conditioning)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_latent_option_composes_onto_a_system_and_diffuses_latents():
    cfg = compose_experiment("magicvideo", ["debug=tiny_latent", "paradigm.autoencoder.weights=null"])
    torch.manual_seed(0)
    module = instantiate(cfg.paradigm, net=instantiate(cfg.model))
    assert module.net.conv_in.in_channels == 4
    videos = module.generate(["a handwritten 3 moving up"], steps=1, num_frames=2)
    assert videos.shape == (1, 1, 2, 16, 16)


NET_SIZES = {"factorized_unet": ["model.channels=[8,16,16]"], "dit": ["model.dim=16", "model.depth=1"],
             "latte": ["model.config.num_layers=1", "model.config.attention_head_dim=8", "model.config.cross_attention_dim=32"]}


@pytest.mark.parametrize("model", list(NET_SIZES))
def test_the_net_takes_its_widths_from_whatever_text_encoder_the_paradigm_builds(model):
    # A text encoder without `text_cfg` (here the digit-label control; a pretrained open_clip tower
    # by name is the same case) used to break `context_dim: ${paradigm.text_encoder.text_cfg.width}`.
    overrides = [f"model={model}", "paradigm/text_encoder=digit_labels", "paradigm.text_encoder.width=24",
                 "paradigm.text_encoder.embed_dim=12", "data.num_frames=4"]
    overrides += NET_SIZES[model]
    with initialize_config_module("experiments.conf", version_base="1.3"):
        cfg = compose("train", ["run_id=test", *overrides])
    module = instantiate(cfg.paradigm, net=instantiate(cfg.model))
    conditioning = module.encode_captions(["a handwritten 3 moving up", "a handwritten 5 moving left"])
    assert conditioning["context"].shape[-1] == 24 and conditioning["pooled"].shape[-1] == 12
    x = torch.randn(2, 1, 4, 16, 16)
    assert module.net(x, torch.tensor([10, 900]), **conditioning).shape == x.shape


def test_no_config_group_is_named_like_a_key_of_the_sample_or_export_config():
    """effvid-sample and effvid-export compose from the same experiments/conf: a group named like
    one of their keys (a `prompts/` group beside sample.yaml's `prompts`) turns `prompts=[...]`
    on their command line into a group choice that does not exist."""
    from omegaconf import OmegaConf

    conf = Path(__file__).parents[1] / "experiments/conf"
    groups = {p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("__")}
    for name in ("sample", "export"):
        keys = set(OmegaConf.load(conf / f"{name}.yaml")) - {"defaults", "hydra"}
        assert not keys & groups, f"{name}.yaml keys that are also config groups: {sorted(keys & groups)}"
    with initialize_config_module("experiments.conf", version_base="1.3"):
        assert compose("sample", ["prompts=[a handwritten 3 moving up]"]).prompts == ["a handwritten 3 moving up"]
