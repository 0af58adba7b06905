"""Pretrained bundles out: what effvid trains on a tiny random diffusers folder of each family
loads back into that family's own diffusers pipeline with the same denoiser output (the
pipeline's denoiser call is captured with a hook, so the pipeline's latent layout, timestep and
text features are the ones compared); exports that do not fit a run are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from experiments.train import run_training
from lit_models.bundle import load_run_module
from lit_models.export import ExportError, export_run
from tests.conftest import compose_config
from tests.test_pretrained_bundles import FAMILIES, PROMPT

pytestmark = pytest.mark.slow  # every test here trains runs or reads the ones trained (make test-fast leaves them out)


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


# --- refused exports, what a fine-tune checkpoint holds ----------------------------------------


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
