"""Pretrained bundles in and out, on tiny random diffusers folders of every supported family:
what effvid trains on a folder loads back into that family's own diffusers pipeline with the
same denoiser output (the pipeline's denoiser call is captured with a hook, so the pipeline's
latent layout, timestep and text features are the ones compared), and text features equal the
pipeline's `encode_prompt` exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from experiments.train import run_training
from lit_models.bundle import BundleError, load_bundle, load_run_module
from lit_models.export import ExportError, export_run
from tests.conftest import compose_config

PROMPT = "a handwritten 3 moving up"


@pytest.fixture(scope="session")
def folders(tiny_pipeline_folders: dict[str, Path]) -> dict[str, Path]:
    return tiny_pipeline_folders


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


def train(folders: dict[str, Path], data_root: Path, runs_dir: Path, family: str, run_id: str, *extra: str) -> Path:
    """A real 2-step effvid-train run of the family's experiment at a learning rate that moves
    the weights visibly; returns its last checkpoint."""
    spec = FAMILIES[family]
    overrides = [
        f"experiment={spec['experiment']}", f"pretrained={folders[family]}", f"data_root={data_root}",
        f"runs_dir={runs_dir}", f"run_id={run_id}", "debug=few_steps", "data.size=32",
        f"data.num_frames={spec['frames']}", "data.shuffle_buffer=4", "data.batch_size=2", "trainer.max_steps=2",
        "trainer.limit_val_batches=0", "~logger", "paradigm.optimizer.lr=0.05", "paradigm.lr_scheduler.num_warmup_steps=0",
    ]  # fmt: skip
    if family == "sd":
        overrides.append(f"bundle.motion_adapter={folders['motion_adapter']}")
    torch.manual_seed(0)
    run_training(compose_config([*overrides, *extra]))
    return runs_dir / run_id / "checkpoints" / "last.ckpt"


LORA_4_8 = ("paradigm.trainable.0.rank=4", "paradigm.trainable.0.alpha=8")  # rank != alpha: scale 2
# run name -> (family, overrides): each trained once per module, shared by the tests that export it
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cogvideox": ("cogvideox", LORA_4_8),
    "ltx": ("ltx", LORA_4_8),
    "wan": ("wan", LORA_4_8),
    "hunyuan": ("hunyuan", LORA_4_8),
    "modelscope": ("modelscope", LORA_4_8),
    "motionlora": ("sd", ("paradigm.trainable.1.rank=4", "paradigm.trainable.1.alpha=8")),  # LoRA after MotionModule
    "motion": ("sd", ("experiment=animatediff_sd15", "paradigm.trainable.0.adapter.motion_num_attention_heads=2")),
    "image-lora": ("sd", ("experiment=finetune_pretrained", "bundle.motion_adapter=null", "paradigm.trainable=[{_target_: "
                          "lit_models.peft.LoRA, target_modules: [to_q, to_k, to_v, to_out.0], rank: 4, alpha: 2}]")),
    "wan-full": ("wan", ("experiment=finetune_pretrained",)),
}


@pytest.fixture(scope="module")
def trained(folders: dict[str, Path], digits_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`trained(name)`: the last checkpoint of run `name` of `RUNS`, trained on first use."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            family, overrides = RUNS[name]
            cache[name] = train(folders, digits_data_root, tmp_path_factory.mktemp("runs"), family, name, *overrides)
        return cache[name]

    return get


def pipeline(name: str, folder: Path, **components: Any) -> Any:
    import diffusers

    pipe = getattr(diffusers, name).from_pretrained(str(folder), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_call(pipe: Any, family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, output) of the pipeline's first denoiser call, as effvid lays them out `(B, C, F, H, W)`."""
    spec = FAMILIES[family]
    component = "unet" if hasattr(pipe, "unet") and pipe.unet is not None else "transformer"
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not seen:
            seen.update(args=args, kwargs=kwargs, out=output[0] if isinstance(output, tuple) else output.sample)

    handle = getattr(pipe, component).register_forward_hook(hook, with_kwargs=True)
    try:
        call = {"guidance_scale": 1.0, **spec["call"]}
        pipe(PROMPT, height=32, width=32, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    args, kwargs, out = seen["args"], seen["kwargs"], seen["out"]
    x = kwargs.get("hidden_states", args[0] if args else kwargs.get("sample"))
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if spec["layout"] == "frames_first":  # CogVideoX: (B, F, C, H, W)
        x, out = x.permute(0, 2, 1, 3, 4), out.permute(0, 2, 1, 3, 4)
    elif spec["layout"] == "packed":  # LTX-Video: (B, tokens, C)
        from diffusers import LTXPipeline

        grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
        x, out = LTXPipeline._unpack_latents(x, *grid), LTXPipeline._unpack_latents(out, *grid)
    return x, torch.as_tensor(t), out


@torch.no_grad()
def effvid_output(module: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return module.net(x, t.reshape(-1).expand(x.shape[0]), **module.encode_captions([PROMPT] * x.shape[0]))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


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


# --- round trips: trained in effvid, loaded by the family's pipeline ----------------------


@pytest.mark.parametrize("run", ["cogvideox", "ltx", "wan", "hunyuan", "motionlora"])
def test_exported_lora_loads_into_the_pipeline_with_effvids_output(
    folders: dict[str, Path], trained: Callable[[str], Path], tmp_path: Path, run: str
) -> None:
    family = RUNS[run][0]
    spec = FAMILIES[family]
    ckpt = trained(run)  # rank 4 != alpha 8: diffusers must scale by alpha / rank = 2, as effvid trained it
    module = load_run_module(ckpt)
    record = export_run(ckpt, tmp_path / "lora")
    assert (record.format, record.weights, record.lora_rank, record.lora_alpha) == ("lora", "raw", 4, 8.0)
    components = {"motion_adapter": _motion_adapter(folders)} if family == "sd" else {}
    base = pipeline(spec["pipeline"], folders[family], **components)
    x, t, base_out = denoiser_call(base, family)
    tuned = pipeline(spec["pipeline"], folders[family], **components)
    tuned.load_lora_weights(str(tmp_path / "lora"))
    x2, t2, tuned_out = denoiser_call(tuned, family)
    assert torch.equal(x, x2) and torch.equal(t, t2)
    ours = effvid_output(module, x, t)
    assert max_difference(ours, tuned_out) <= 1e-5
    assert max_difference(tuned_out, base_out) > 1e-3  # the LoRA changed the denoiser


def _motion_adapter(folders: dict[str, Path]) -> Any:
    from diffusers import MotionAdapter

    return MotionAdapter.from_pretrained(str(folders["motion_adapter"]))


@pytest.mark.parametrize("run", ["modelscope", "cogvideox", "ltx", "wan", "hunyuan", "motionlora"])
def test_merged_full_export_loads_whole_with_effvids_output(
    folders: dict[str, Path], trained: Callable[[str], Path], tmp_path: Path, run: str
) -> None:
    family = RUNS[run][0]
    spec = FAMILIES[family]
    ckpt = trained(run)
    module = load_run_module(ckpt)
    record = export_run(ckpt, tmp_path / "merged", format="full")
    assert record.format == "full" and json.loads((tmp_path / "merged" / "effvid_export.json").read_text())["weights"] == "raw"
    import diffusers

    component = "unet" if family in ("modelscope", "sd") else "transformer"
    components = {"motion_adapter": _motion_adapter(folders)} if family == "sd" else {}
    model_class = type(getattr(pipeline(spec["pipeline"], folders[family], **components), component))
    _, info = model_class.from_pretrained(str(tmp_path / "merged"), subfolder=component, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no weight initialised anew
    merged = pipeline(spec["pipeline"], tmp_path / "merged")  # an AnimateDiff folder holds its motion U-Net
    x, t, merged_out = denoiser_call(merged, family)
    _, _, base_out = denoiser_call(pipeline(spec["pipeline"], folders[family], **components), family)
    assert max_difference(effvid_output(module, x, t), merged_out) <= 1e-5
    assert max_difference(merged_out, base_out) > 1e-3
    assert isinstance(merged, getattr(diffusers, spec["pipeline"]))


def test_trained_motion_modules_export_as_a_motion_adapter_animatediff_loads(
    folders: dict[str, Path], trained: Callable[[str], Path], tmp_path: Path
) -> None:
    from diffusers import MotionAdapter

    ckpt = trained("motion")
    module = load_run_module(ckpt)
    record = export_run(ckpt, tmp_path / "adapter")
    assert (record.format, record.trained) == ("motion_adapter", "motion")
    animatediff = pipeline("AnimateDiffPipeline", folders["sd"],
                           motion_adapter=MotionAdapter.from_pretrained(str(tmp_path / "adapter")))
    x, t, out = denoiser_call(animatediff, "sd")
    assert max_difference(effvid_output(module, x, t), out) <= 1e-5
    # New motion modules start at the image model (zeroed outputs) and training moved them.
    image = pipeline("StableDiffusionPipeline", folders["sd"])
    frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*F, C, H, W)
    context = image.encode_prompt([PROMPT] * frames.shape[0], "cpu", 1, False)[0]
    with torch.no_grad():
        per_frame = image.unet(frames, t, encoder_hidden_states=context).sample
    assert max_difference(out.permute(0, 2, 1, 3, 4).flatten(0, 1), per_frame) > 1e-4


def test_image_unet_lora_exports_with_kohya_comfyui_keys_diffusers_reads(
    folders: dict[str, Path], trained: Callable[[str], Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    ckpt = trained("image-lora")
    module = load_run_module(ckpt)
    export_run(ckpt, tmp_path / "comfy", format="comfyui")
    keys = load_file(str(tmp_path / "comfy" / "lora_comfyui.safetensors"))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {float(v) for k, v in keys.items() if k.endswith(".alpha")} == {2.0}
    image = pipeline("StableDiffusionPipeline", folders["sd"])
    image.load_lora_weights(str(tmp_path / "comfy"), weight_name="lora_comfyui.safetensors")
    seen: dict[str, Any] = {}
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.setdefault("io", (args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    handle = image.unet.register_forward_hook(hook, with_kwargs=True)
    image(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
          generator=torch.Generator().manual_seed(0))
    handle.remove()
    (sample, t), _, out = seen["io"]
    ours = effvid_output(module, sample[:, :, None], torch.as_tensor(t))[:, :, 0]  # one frame
    assert max_difference(ours, out) <= 1e-5


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


def test_exports_that_do_not_fit_the_run_are_refused_and_leave_nothing(
    trained: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = trained("modelscope")
    with pytest.raises(ExportError, match="diffusers cannot load a LoRA into the modelscope family's denoiser"):
        export_run(ckpt, tmp_path / "a", format="lora")
    with pytest.raises(ExportError, match="format=motion_adapter: the run trained lora"):
        export_run(ckpt, tmp_path / "b", format="motion_adapter")
    with pytest.raises(ExportError, match="format=comfyui .* the modelscope family"):
        export_run(ckpt, tmp_path / "c", format="comfyui")
    assert not any(p.name in ("a", "b", "c") or ".tmp-" in p.name for p in tmp_path.iterdir())

    import lit_models.export as export

    def crash(*args: Any) -> None:
        (args[1] / "half-written.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_full", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(ckpt, tmp_path / "d")  # auto: full, for a modelscope LoRA
    assert not (tmp_path / "d").exists() and not any(".tmp-" in p.name for p in tmp_path.iterdir())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(ckpt, tmp_path / "e")


def test_fine_tune_checkpoints_hold_only_what_trained(trained: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = trained("wan-full")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("net.model.") for k in checkpoint["state_dict"])
    assert not any(k.startswith(("text_encoder.", "autoencoder.")) for k in checkpoint["state_dict"])
    optimized = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimized == len(checkpoint["state_dict"])  # the VAE and text encoder never entered the optimizer
    record = export_run(ckpt, tmp_path / "full")
    assert (record.format, record.trained, record.weights) == ("full", "full", "raw")


@pytest.mark.parametrize(
    "family, injector, trained",
    [
        ("cogvideox", "{_target_: lit_models.peft.SimDAAdapters}", "adapter"),
        ("modelscope", "{_target_: lit_models.peft.SimDAAdapters}", "adapter"),
        ("sd", "{_target_: lit_models.peft.ControlBranch}", "controlnet"),
    ],
)
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
