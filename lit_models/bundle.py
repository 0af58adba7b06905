"""Model bundles: what a run trains and samples with, loaded with one key.

A bundle is the denoiser, its VAE (none, per-frame, or a video VAE), its text encoder with the
pipeline's own tokenization, and its noise schedule. `load_bundle(ref)` takes

- a diffusers pipeline folder (`model_index.json`): AnimateDiff on an SD 1.x folder (with
  `motion_adapter=`), ModelScope, CogVideoX, LTX-Video, Wan, HunyuanVideo, Latte (`families.py`);
- a Hugging Face hub id, from the local cache (`HF_HUB_OFFLINE=1` is respected);
- an effvid run (`runs/RUN_ID`, a run id, or a checkpoint path).

This is the only place that reads effvid checkpoints for their models (`load_run_module`), and
it rebuilds from a stored config only through `trusted_config`: a config inside an artifact is
data. `build_module(cfg)` is the one builder effvid-train, effvid-sample, effvid-export and the
data tools share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_models.families import TEXT_ENCODERS, TOKENIZERS, Family, family_for_pipeline, spatial_multiple
from lit_models.flow_matching import is_flow_matching
from lit_models.samplers import PIPELINE_SCHEDULER_KEY
from lit_models.trusted_config import check_trusted

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BundleError(ValueError):
    """A pretrained reference cannot be loaded as a bundle (the message names what and why)."""


@dataclass
class ModelBundle:
    """The parts a paradigm is built from (`components()` are its constructor arguments)."""

    net: nn.Module
    noise_scheduler: Any
    text_encoder: nn.Module | None
    autoencoder: nn.Module | None
    source: str
    family: Family | None = None  # the diffusers family (an effvid run on a folder keeps its folder's)
    pipeline_class: str | None = None
    from_run: bool = False  # an effvid run: its trained weights (LoRA merged) are the base

    def components(self) -> dict[str, Any]:
        return {"net": self.net, "text_encoder": self.text_encoder, "autoencoder": self.autoencoder,
                "noise_scheduler": self.noise_scheduler}  # fmt: skip


# --- resolving a reference ------------------------------------------------------------------


def resolve_pretrained(ref: str | Path, runs_dir: str | Path | None = None) -> tuple[str, Path]:
    """`("pipeline", folder)`, `("run", checkpoint)` for what `ref` names, with a clear error."""
    from experiments.run_dir import runs_root

    text = str(ref)
    path = Path(text).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise BundleError(f"pretrained={text}: checkpoint not found")
        return "run", path
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline", path
        if (path / "config.yaml").is_file():
            return "run", _run_checkpoint(path, text)
        raise BundleError(
            f"pretrained={text}: the folder has neither model_index.json (a diffusers pipeline) nor config.yaml (an effvid run)"
        )
    run_dir = runs_root(runs_dir) / text
    if "/" not in text and (run_dir / "config.yaml").is_file():
        return "run", _run_checkpoint(run_dir, text)
    if HUB_ID.match(text) and not path.exists():
        return "pipeline", _hub_folder(text)
    raise BundleError(f"pretrained={text}: no such folder, run, checkpoint or hub id")


def _run_checkpoint(run_dir: Path, ref: str) -> Path:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise BundleError(f"pretrained={ref}: run {run_dir} has no checkpoints/last.ckpt yet")
    return ckpt


def _hub_folder(repo_id: str) -> Path:
    """A hub id's snapshot from the local Hugging Face cache (downloaded unless HF_HUB_OFFLINE)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(DiffusionPipeline.download(repo_id, local_files_only=offline))
    except Exception as error:  # huggingface_hub raises several types for a missing or unreachable repo
        if offline:
            raise BundleError(
                f"pretrained={repo_id}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE=1; download it where there is a network (huggingface-cli download "
                f"{repo_id}) or pass a local folder"
            ) from None
        raise BundleError(f"pretrained={repo_id}: cannot download it from the hub: {error}") from None


# --- diffusers pipeline folders -----------------------------------------------------------------


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise BundleError(f"{path}: no _class_name (not a diffusers pipeline index)")
    return index


def _component_class(folder: Path, index: dict[str, Any], name: str, allowed: tuple[str, ...]) -> type:
    import diffusers
    import transformers

    entry = index.get(name)
    if not entry or entry[1] is None:
        raise BundleError(f"{folder}: model_index.json has no {name!r} component, which this family needs")
    library, class_name = entry
    if class_name not in allowed:
        raise BundleError(
            f"{folder}/{name}: component class {class_name} is not supported here; effvid loads {', '.join(allowed)}"
        )
    if not (folder / name).is_dir():
        raise BundleError(f"{folder}: model_index.json lists {name!r} ({class_name}) but {folder / name}/ is missing")
    return getattr(transformers if library == "transformers" else diffusers, class_name)


def _load(cls: type, folder: Path, name: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(str(folder), subfolder=name, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise BundleError(f"{folder / name}: cannot load {cls.__name__}: {str(error).splitlines()[0]}") from None


def training_scheduler(folder_scheduler: Any) -> Any:
    """The scheduler effvid trains with for a folder's scheduler, which it records for
    `sampler=pipeline`: flow-matching ones as they are, CogVideoX's as its DDIM (same SNR-shifted
    schedule, with `add_noise` / `get_velocity`), the rest as a `DDPMScheduler` of the same betas."""
    from diffusers import CogVideoXDDIMScheduler, DDPMScheduler

    config = dict(folder_scheduler.config)
    name = type(folder_scheduler).__name__
    if is_flow_matching(folder_scheduler):
        train = type(folder_scheduler).from_config(config)
    elif name.startswith("CogVideoX"):
        train = CogVideoXDDIMScheduler.from_config(config)
    else:
        train = DDPMScheduler.from_config(config)
    train.register_to_config(**{PIPELINE_SCHEDULER_KEY: {**config, "_class_name": name}})
    return train


def load_pipeline_bundle(
    folder: Path,
    motion_adapter: str | None = None,
    text_max_length: int | None = None,
    frame_rate: float | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
) -> ModelBundle:
    """A bundle from a diffusers pipeline folder (see the module docstring for the families)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from lit_models.prompt_encoders import PipelinePromptEncoder

    if dtype not in DTYPES:
        raise BundleError(f"bundle.dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    index = _read_index(folder)
    pipeline_name = index["_class_name"]
    try:
        family = family_for_pipeline(pipeline_name, str(folder / "model_index.json"))
    except ValueError as error:
        raise BundleError(str(error)) from None

    vae = _load(_component_class(folder, index, "vae", family.vae_classes), folder, "vae", torch_dtype=torch_dtype)
    denoiser_class = _component_class(folder, index, family.denoiser_component, family.denoiser_classes)
    model = _load(denoiser_class, folder, family.denoiser_component, torch_dtype=torch_dtype)
    if motion_adapter is not None:
        model = _with_motion_adapter(model, motion_adapter, family, torch_dtype)
    if gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise BundleError(f"bundle.gradient_checkpointing: {type(model).__name__} does not support it")
        model.enable_gradient_checkpointing()
    net = family.wrap_denoiser(model, vae)
    if frame_rate is not None:
        if not hasattr(net, "frame_rate"):
            raise BundleError(f"bundle.frame_rate is for LTX-Video (its RoPE scale); the {family.name} family has none")
        net.frame_rate = float(frame_rate)

    text: dict[str, Any] = {}
    for suffix in ("", "_2") if (index.get("text_encoder_2") or [None, None])[1] else ("",):
        text[f"tokenizer{suffix}"] = _load(_component_class(folder, index, f"tokenizer{suffix}", TOKENIZERS), folder,
                                           f"tokenizer{suffix}")
        text[f"text_encoder{suffix}"] = _load(_component_class(folder, index, f"text_encoder{suffix}", TEXT_ENCODERS),
                                              folder, f"text_encoder{suffix}", dtype=torch_dtype)
    length = text_max_length or family.text_length({**text, family.denoiser_component: model})
    text_encoder = PipelinePromptEncoder(getattr(diffusers, pipeline_name), max_length=length, **text)

    scheduler_name = (index.get("scheduler") or [None, None])[1]
    scheduler_class = getattr(diffusers, str(scheduler_name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise BundleError(f"{folder}/scheduler: {scheduler_name!r} is not a diffusers scheduler")
    scheduler = training_scheduler(_load(scheduler_class, folder, "scheduler"))
    if is_flow_matching(scheduler) != family.flow_matching:
        expected = "flow-matching" if family.flow_matching else "DDPM-style"
        raise BundleError(f"{folder}/scheduler: {scheduler_name} is not the {expected} schedule the {family.name} family trains with")

    autoencoder = family.wrap_vae(vae, patch_size=spatial_multiple(net))
    return ModelBundle(net=net, noise_scheduler=scheduler, text_encoder=text_encoder, autoencoder=autoencoder,
                       source=str(folder), family=family, pipeline_class=pipeline_name)  # fmt: skip


def _with_motion_adapter(unet: nn.Module, ref: str, family: Family, torch_dtype: torch.dtype) -> nn.Module:
    from diffusers import MotionAdapter, UNetMotionModel

    if not family.motion_modules:
        raise BundleError(f"bundle.motion_adapter: the {family.name} family has no motion modules (AnimateDiff only)")
    if type(unet).__name__ == "UNetMotionModel":
        raise BundleError("bundle.motion_adapter: this folder's U-Net already holds motion modules (an AnimateDiff folder)")
    kind, path = ("pipeline", Path(ref)) if Path(ref).is_dir() else ("hub", _hub_folder(ref))
    if not (path / "config.json").is_file():
        raise BundleError(f"bundle.motion_adapter={ref}: no config.json there (a MotionAdapter save_pretrained folder?)")
    try:
        adapter = MotionAdapter.from_pretrained(str(path), torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise BundleError(f"bundle.motion_adapter={ref}: cannot load a MotionAdapter: {str(error).splitlines()[0]}") from None
    if list(adapter.config.block_out_channels) != list(unet.config.block_out_channels):
        raise BundleError(
            f"bundle.motion_adapter={ref}: block_out_channels {list(adapter.config.block_out_channels)} do not match "
            f"the U-Net's {list(unet.config.block_out_channels)}"
        )
    return UNetMotionModel.from_unet2d(unet, adapter)


# --- effvid runs ------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint loaded with `weights_only=True`, naming the file when it cannot be read."""
    from experiments.checkpoints import load_checkpoint_file

    try:
        return load_checkpoint_file(path)
    except Exception as error:  # RunError and friends: one message naming the file
        raise BundleError(str(error)) from None


def run_config(checkpoint: dict[str, Any], path: str | Path) -> DictConfig:
    stamp = checkpoint.get("effvid")
    if not isinstance(stamp, dict) or "config" not in stamp:
        raise BundleError(f"{path} has no effvid stamp (config); is it an effvid-train checkpoint?")
    cfg = OmegaConf.create(stamp["config"])
    check_trusted(cfg, where=str(path))
    return cfg


def load_run_module(ckpt: str | Path, weights: str = "auto") -> nn.Module:
    """The whole paradigm module of an effvid run in eval mode (see `load_run`)."""
    return load_run(ckpt, weights)[0]


def load_run(ckpt: str | Path, weights: str = "auto") -> tuple[nn.Module, DictConfig, str]:
    """(module in eval mode, the run's config, "ema" | "raw"): the paradigm module of an effvid
    run, built from the checkpoint's config through effvid's own builders (PEFT runs: their base
    first, then their trained weights).

    Args:
        weights: `auto` (the EMA average when the run averaged, else the raw weights), `ema` or `raw`.
    """
    checkpoint = read_checkpoint(ckpt)
    cfg = run_config(checkpoint, ckpt)
    text_encoder = cfg.paradigm.get("text_encoder")
    if text_encoder is not None and text_encoder.get("weights"):
        # A pretrained text tower's file is only where training started: the checkpoint holds
        # the tower, so a run copied elsewhere loads without it.
        text_encoder.weights = None
    module = build_module(cfg)
    state, kind = checkpoint_weights(checkpoint, weights, ckpt)
    result = module.load_state_dict(state, strict=False)
    trained = getattr(module, "trainable_names", None)  # PEFT: only its trained weights are stored
    missing = [k for k in result.missing_keys if trained is None or k in trained]
    if missing or result.unexpected_keys:
        raise BundleError(
            f"checkpoint {ckpt} does not match the model of its config: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    return module.eval(), cfg, kind


def checkpoint_weights(checkpoint: dict[str, Any], weights: str, path: str | Path) -> tuple[dict[str, Any], str]:
    """(state dict, "ema" | "raw"). Lightning's weight averaging keeps the average in `state_dict`
    and the raw weights in `current_model_state`; an average that has not started yet (its
    `n_averaged` is 0, e.g. a short fine-tune before `update_starting_at_step`) still holds the
    starting weights, so `auto` takes the raw ones then."""
    if weights not in ("auto", "ema", "raw"):
        raise BundleError(f"weights={weights!r}: choose auto, ema or raw")
    raw = checkpoint.get("current_model_state")
    if raw is None:
        if weights == "ema":
            raise BundleError(f"weights=ema: {path} was trained without EMA (callbacks.ema=null); use weights=raw")
        return checkpoint["state_dict"], "raw"
    averaged = checkpoint.get("averaging_state", {}).get("n_averaged")
    started = averaged is None or int(averaged) > 0
    if weights == "raw" or (weights == "auto" and not started):
        return raw, "raw"
    if not started:
        raise BundleError(f"weights=ema: the EMA of {path} has not started averaging yet (n_averaged=0); use weights=raw")
    return checkpoint["state_dict"], "ema"


def load_run_bundle(ckpt: Path) -> ModelBundle:
    """The bundle of an effvid run: its (EMA) denoiser with any LoRA merged in, text encoder,
    VAE and schedule, to fine-tune further or sample."""
    from lit_models.lora import lora_layers, merge_and_unload_lora

    module = load_run_module(ckpt)
    net = module.net
    if lora_layers(net):
        net = merge_and_unload_lora(net)
    for part in (module.text_encoder, getattr(module, "autoencoder", None)):
        if part is not None:  # a bundle's encoders are frozen, whatever the run did with them
            part.requires_grad_(False)
            part.trainable = False
    net.requires_grad_(True)
    return ModelBundle(net=net, noise_scheduler=module.noise_scheduler, text_encoder=module.text_encoder,
                       autoencoder=getattr(module, "autoencoder", None), source=str(ckpt),
                       family=getattr(module, "bundle_family", None), pipeline_class=getattr(module, "bundle_pipeline", None),
                       from_run=True)  # fmt: skip


def load_bundle(ref: str | Path, runs_dir: str | Path | None = None, **options: Any) -> ModelBundle:
    """The bundle `ref` names (see the module docstring); `options` are `load_pipeline_bundle`'s."""
    kind, path = resolve_pretrained(ref, runs_dir)
    if kind == "pipeline":
        return load_pipeline_bundle(path, **options)
    used = {k: v for k, v in options.items() if v not in (None, False, "float32")}
    if used:
        raise BundleError(f"pretrained={ref} is an effvid run; bundle options {sorted(used)} are for diffusers folders")
    return load_run_bundle(path)


def bundle_options(cfg: DictConfig) -> dict[str, Any]:
    options = cfg.get("bundle") or {}
    return dict(OmegaConf.to_container(options, resolve=True)) if isinstance(options, DictConfig) else dict(options)


# --- the one builder --------------------------------------------------------------------------


def build_module(cfg: DictConfig) -> nn.Module:
    """The LightningModule of a composed config: the paradigm over `pretrained=`'s bundle, or over
    the network `model=` builds (a paradigm without a denoiser, e.g. Make-A-Video's clip stage,
    runs with model=null)."""
    from hydra.utils import instantiate

    if cfg.get("pretrained"):
        if cfg.get("model") is not None:
            raise BundleError(
                "pretrained= gives the denoiser; drop the model= choice (experiments on a bundle set model: null)"
            )
        bundle = load_bundle(cfg.pretrained, runs_dir=cfg.get("runs_dir"), **bundle_options(cfg))
        try:
            module = instantiate(cfg.paradigm, **bundle.components())
        except TypeError as error:
            raise BundleError(f"paradigm {cfg.paradigm._target_} cannot start from a pretrained bundle: {error}") from None
        module.bundle_family = bundle.family
        module.bundle_pipeline = bundle.pipeline_class
        module.bundle_from_run = bundle.from_run
        if hasattr(module, "external_parts"):  # rebuilt from pretrained= at every load: not checkpointed
            module.external_parts = ("text_encoder.", "autoencoder.")
        return module
    return instantiate(cfg.paradigm, net=instantiate(cfg.model) if cfg.get("model") else None)
