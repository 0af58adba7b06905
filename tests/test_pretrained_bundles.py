"""Pretrained bundles in, on tiny random diffusers folders of every supported family: text
features equal the pipeline's `encode_prompt` exactly; a folder, hub id, paradigm or shape that
does not fit is refused with one clear message; adapters and a control branch start at the
bundle's output and train alone. (What is trained and exported: test_pretrained_export.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_models.bundle import BundleError, load_bundle
from tests.conftest import compose_config

PROMPT = "a handwritten 3 moving up"


# family -> experiment, clip frames, the pipeline call, how the pipeline lays out the denoiser's input
FAMILIES: dict[str, dict[str, Any]] = {
    "cogvideox": dict(experiment="cogvideox_lora", frames=9, pipeline="CogVideoXPipeline",
                      call=dict(num_frames=9, max_sequence_length=16), layout="frames_first"),
    "ltx": dict(experiment="ltx_video_lora", frames=9, pipeline="LTXPipeline",
                call=dict(num_frames=9, max_sequence_length=128), layout="packed"),
    "wan": dict(experiment="wan_t2v_lora", frames=9, pipeline="WanPipeline", call=dict(num_frames=9), layout="video"),
    "modelscope": dict(experiment="modelscope_t2v", frames=8, pipeline="TextToVideoSDPipeline",
                       call=dict(num_frames=8), layout="video"),
    "sd": dict(experiment="animatediff_motionlora", frames=8, pipeline="AnimateDiffPipeline",
               call=dict(num_frames=8), layout="video"),
    # guidance-distilled: the pipeline's guidance_scale is the embedded guidance effvid's wrapper holds
    "hunyuan": dict(experiment="hunyuan_video_lora", frames=9, pipeline="HunyuanVideoPipeline",
                    call=dict(num_frames=9, guidance_scale=6.0), layout="video"),
}


# --- text conditioning parity -------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "modelscope", "cogvideox", "ltx", "wan", "latte", "hunyuan"])
@torch.no_grad()  # as the pipelines run it (autograd mode picks other kernels, ~1e-6 apart)
def test_bundle_text_features_equal_the_pipelines_encode_prompt(folders: dict[str, Path], family: str) -> None:
    from diffusers import DiffusionPipeline

    bundle = load_bundle(folders[family])
    pipe = DiffusionPipeline.from_pretrained(str(folders[family]))
    prompts = [PROMPT, "", "a handwritten 7 moving down-left"]
    ours = bundle.text_encoder.encode(prompts)
    length = bundle.text_encoder.max_length
    if family in ("sd", "modelscope"):
        theirs, mask = pipe.encode_prompt(prompts, "cpu", 1, False)[0], None
    elif family == "ltx":
        theirs, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length)
    elif family == "latte":
        theirs, mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, mask_feature=False, clean_caption=False)[0], None
    elif family == "hunyuan":
        theirs, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length=length)
        assert torch.equal(ours.pooled, pooled)  # CLIP's pooled feature, beside the Llama tokens
    else:
        theirs, mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length)[0], None
    assert torch.equal(ours.tokens, theirs)
    assert (ours.mask is None) == (mask is None) and (mask is None or torch.equal(ours.mask, mask.bool()))
    if family in ("sd", "modelscope"):  # CLIP pads with <|endoftext|>, not open_clip's 0
        tokenizer = bundle.text_encoder.tokenizer
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>") > 0


# --- bad input: one clear message naming the folder, component, key or number ----------------


def test_bad_folders_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "no_vae"
    shutil.copytree(folders["cogvideox"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(BundleError, match=r"no_vae.*'vae'.*missing"):
        load_bundle(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(folders["wan"], foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    (foreign / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["my_pkg", "EvilEncoder"]}))
    with pytest.raises(BundleError, match=r"text_encoder: component class EvilEncoder is not supported"):
        load_bundle(foreign)
    (foreign / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(BundleError, match=r"FluxPipeline.*not supported"):
        load_bundle(foreign)
    with pytest.raises(BundleError, match="neither model_index.json"):
        load_bundle(tmp_path)


def test_a_hub_id_loads_from_the_local_cache_and_an_uncached_one_is_named_offline(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--effvid-tests--tiny-wan" / "snapshots" / ("a" * 40)
    shutil.copytree(folders["wan"], snapshot)
    (cache / "models--effvid-tests--tiny-wan" / "refs").mkdir()
    (cache / "models--effvid-tests--tiny-wan" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = load_bundle("effvid-tests/tiny-wan")
    assert bundle.family.name == "wan" and Path(bundle.source).resolve() == snapshot.resolve()
    with pytest.raises(BundleError, match=r"effvid-tests/not-there: not in the local Hugging Face cache .*HF_HUB_OFFLINE=1"):
        load_bundle("effvid-tests/not-there")


def test_paradigms_and_shapes_that_do_not_fit_the_family_are_refused(
    folders: dict[str, Path], digits_data_root: Path, tmp_path: Path
) -> None:
    from lit_models.bundle import build_module

    def build(*overrides: str) -> Any:
        base = ["experiment=cogvideox_lora", f"pretrained={folders['cogvideox']}", "run_id=x", "data.size=32",
                "data.num_frames=9"]  # fmt: skip
        return build_module(compose_config([*base, *overrides]))

    # (Hydra wraps what a constructor raises; effvid-train prints it as its one-line error)
    with pytest.raises(Exception, match="motion modules go into a diffusers image U-Net.*not a CogVideoXBackbone"):
        build("paradigm.trainable=[{_target_: lit_models.peft.MotionModule}]")
    with pytest.raises(Exception, match=r"data.num_frames=8.*4k\+1 frames \(e.g. 5 or 9\)"):
        build("data.num_frames=8")
    with pytest.raises(Exception, match=r"24x24 px; this family needs multiples of 16"):
        build("data.size=24")
    with pytest.raises(ValueError, match="bundle.motion_adapter: the cogvideox family has no motion modules"):
        build(f"bundle.motion_adapter={folders['motion_adapter']}")
    with pytest.raises(BundleError, match="pretrained= gives the denoiser; drop the model= choice"):
        build_module(compose_config([f"pretrained={folders['cogvideox']}", "run_id=x"]))



@pytest.mark.parametrize(
    "family, injector, trained",
    [
        ("cogvideox", "{_target_: lit_models.peft.SimDAAdapters}", "adapter"),
        ("modelscope", "{_target_: lit_models.peft.SimDAAdapters}", "adapter"),
        ("sd", "{_target_: lit_models.peft.ControlBranch}", "controlnet"),
    ],
)
@pytest.mark.slow
def test_adapters_and_control_branch_start_at_the_bundle_and_train_alone(
    folders: dict[str, Path], tmp_path: Path, family: str, injector: str, trained: str
) -> None:
    from lit_models.bundle import build_module
    from lit_models.nets.control import sobel_edges

    frames = FAMILIES[family]["frames"]
    overrides = ["experiment=finetune_pretrained", f"pretrained={folders[family]}", "run_id=x", "data.size=32",
                 f"data.num_frames={frames}", f"paradigm.trainable=[{injector}]", "paradigm.lr_scheduler.num_warmup_steps=0"]  # fmt: skip
    if family == "sd":
        overrides += [f"bundle.motion_adapter={folders['motion_adapter']}", "paradigm.control_signal=sobel_edges"]
    torch.manual_seed(0)
    module = build_module(compose_config(overrides))
    base = load_bundle(folders[family], **({"motion_adapter": str(folders["motion_adapter"])} if family == "sd" else {}))
    video = torch.rand(2, 3, frames, 32, 32) * 2 - 1
    batch = {"video": video, "caption": [PROMPT, "a handwritten 7 moving left"]}
    x = module.encode_data(video)
    t = torch.tensor([100, 700])
    conditioning = module.condition(batch, drop=False)
    with torch.no_grad():
        plain = {k: v for k, v in conditioning.items() if k != "control"}
        assert torch.equal(module.net(x, t, **conditioning), base.net(x, t, **plain))  # zero-initialised
    before = {k: v.clone() for k, v in torch.nn.Module.state_dict(module).items()}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.diffusion_loss(x, conditioning).mean().backward()
    optimizer.step()
    changed = {k for k, v in torch.nn.Module.state_dict(module).items() if not torch.equal(v, before[k])}
    assert changed and all(trained in k for k in changed)
    assert module.trainable_names and all(trained in k for k in module.trainable_names)
