"""Export is the other half of import: what a run trained, as the artifact its family's diffusers
pipeline loads.

| format | holds | loads with |
|---|---|---|
| `lora` | the LoRA in diffusers' layout, its rank and alpha recorded | `pipe.load_lora_weights(DIR)` |
| `comfyui` | the LoRA with kohya / ComfyUI keys (`lora_unet_...`, `.alpha`); U-Net families | ComfyUI, `pipe.load_lora_weights(DIR)` |
| `motion_adapter` | AnimateDiff motion modules (any LoRA on them merged) | `MotionAdapter.from_pretrained(DIR)` |
| `full` | the family's whole pipeline folder with the trained denoiser (LoRA merged) | `Pipeline.from_pretrained(DIR)` |

`auto` picks what the run trained: LoRA -> `lora` (or `full` where diffusers has no LoRA loader for
the denoiser), motion modules -> `motion_adapter`, a full fine-tune -> `full`. A format that cannot
hold what the run trained is refused with the reason. The folder is written beside `DIR` and
renamed into place when complete, so `DIR` never holds half an export. `effvid_export.json`
records the run, the step, and which weights (EMA or raw) were written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lit_models.bundle import BundleError, load_run, read_checkpoint
from lit_models.diffusers_pipelines import denoiser_model, family_pipeline
from lit_models.injectors import MotionModule, save_motion_adapter
from lit_models.lora import LoRA, lora_layers, merge_and_unload_lora

FORMATS = ("auto", "lora", "comfyui", "motion_adapter", "full")
LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "effvid_export.json"


class ExportError(ValueError):
    """The run cannot be exported as asked (the message says why and what to use instead)."""


@dataclass
class ExportRecord:
    run: str
    checkpoint: str
    step: int
    format: str
    weights: str  # "ema" | "raw"
    family: str | None
    pipeline: str | None
    trained: str
    loads_with: str
    lora_rank: int | None = None
    lora_alpha: float | None = None


def trained_kind(module: nn.Module) -> str:
    """What a run trained: lora, motion_lora, motion, full, or the name of another injector."""
    injectors = list(getattr(module, "injectors", None) or [])
    if not injectors:
        return "full"
    kinds = [type(i).__name__ for i in injectors]
    loras = [i for i in injectors if isinstance(i, LoRA)]
    motions = [i for i in injectors if isinstance(i, MotionModule)]
    if len(loras) + len(motions) != len(injectors):
        other = next(k for k in kinds if k not in ("LoRA", "MotionModule"))
        return other
    if motions and any(m.train for m in motions):
        return "motion" if not loras else "motion+lora"
    return "motion_lora" if motions else "lora"


def choose_format(requested: str, trained: str, module: nn.Module) -> str:
    """The format `auto` means for what the run trained (see the module docstring)."""
    family = getattr(module, "bundle_family", None)
    if requested not in FORMATS:
        raise ExportError(f"format={requested!r}: choose one of {', '.join(FORMATS)}")
    if trained not in ("lora", "motion_lora", "motion", "motion+lora", "full"):
        raise ExportError(
            f"this run trained {trained} modules, which no diffusers artifact here holds (LoRA, motion modules or "
            "a whole denoiser); its checkpoint is the artifact: effvid-sample run=RUN_ID"
        )
    if requested != "auto":
        return requested
    if trained in ("motion", "motion+lora"):
        return "motion_adapter"
    if trained in ("lora", "motion_lora") and family is None:
        return "lora"
    # A LoRA trained on another fine-tuned run applies only on top of that run's merged weights.
    if trained in ("lora", "motion_lora") and family.lora_pipeline and not getattr(module, "bundle_from_run", False):
        return "lora"
    return "full"


def _check_fits(fmt: str, trained: str, module: nn.Module) -> None:
    family = getattr(module, "bundle_family", None)
    if fmt in ("lora", "comfyui") and trained not in ("lora", "motion_lora"):
        raise ExportError(f"format={fmt}: the run trained {trained}, not only LoRA; use format=auto")
    if fmt in ("comfyui", "motion_adapter", "full") and family is None:
        raise ExportError(
            f"format={fmt}: this run's model is effvid's own network, which has no diffusers pipeline; "
            "its checkpoint is the artifact (format=lora writes a LoRA as safetensors)"
        )
    if fmt in ("lora", "comfyui") and family is not None and getattr(module, "bundle_from_run", False):
        raise ExportError(
            f"format={fmt}: this LoRA was trained on another effvid run (pretrained=...), whose own training is "
            "merged into its base, so it does not apply to the original folder; use format=full"
        )
    if fmt == "lora" and family is not None and family.lora_pipeline is None:
        raise ExportError(
            f"format=lora: diffusers cannot load a LoRA into the {family.name} family's denoiser "
            f"({type(denoiser_model(module.net)).__name__}); use format=full (the LoRA merged into a pipeline folder)"
        )
    if fmt == "comfyui" and (family.name != "animatediff" or trained == "motion_lora"):
        raise ExportError(
            f"format=comfyui writes kohya-style keys for image U-Net LoRAs (the animatediff family's SD 1.x U-Net); "
            f"this run trained {trained} on the {family.name} family: use format=lora"
        )
    if fmt == "motion_adapter" and not trained.startswith("motion"):
        raise ExportError(f"format=motion_adapter: the run trained {trained}, not AnimateDiff motion modules")


def _lora_config(module: nn.Module) -> LoRA:
    loras = [i for i in module.injectors if isinstance(i, LoRA)]
    if len(loras) != 1:
        raise ExportError(f"the run has {len(loras)} LoRA injectors; export handles one")
    return loras[0]


def _lora_state(net: nn.Module, prefix: str, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    if not state:
        raise ExportError("the net has no LoRA weights")
    return {k.removeprefix(prefix): v.detach().float().contiguous() for k, v in state.items()}


def _write_lora(module: nn.Module, out: Path) -> tuple[str, LoRA]:
    import diffusers

    lora = _lora_config(module)
    family = module.bundle_family
    metadata = lora.config().to_dict()
    if family is None:  # effvid's own net: peft's keys, alpha in the metadata (lit_models.lora.import_lora)
        from lit_models.lora import export_lora

        export_lora(module.net, out / LORA_FILE, lora)
        return "lit_models.lora.import_lora(net, DIR / 'pytorch_lora_weights.safetensors')", lora
    attribute = "unet" if family.denoiser_component == "unet" and hasattr(module.net, "unet") else "model"
    state = _lora_state(module.net, f"{attribute}.", lora.adapter_name)
    pipeline = getattr(diffusers, family.lora_pipeline)
    component = family.denoiser_component
    pipeline.save_lora_weights(
        str(out), **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata}
    )
    return f"{family.lora_pipeline}.from_pretrained(BASE); pipe.load_lora_weights(DIR)", lora


def _write_comfyui(module: nn.Module, out: Path) -> tuple[str, LoRA]:
    """kohya / ComfyUI keys for an SD-family U-Net LoRA: `lora_unet_<module path with _>` with
    `.lora_down.weight` (A), `.lora_up.weight` (B) and the scalar `.alpha`."""
    from safetensors.torch import save_file

    lora = _lora_config(module)
    state = _lora_state(module.net, "unet.", lora.adapter_name)
    kohya: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        path, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + path.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    save_file(kohya, str(out / "lora_comfyui.safetensors"), metadata={"format": "pt", "ss_network_dim": str(lora.rank),
                                                                       "ss_network_alpha": str(lora.alpha)})
    return "ComfyUI LoraLoader; or pipe.load_lora_weights(DIR, weight_name='lora_comfyui.safetensors')", lora


def _write_motion_adapter(module: nn.Module, out: Path) -> str:
    net = merge_and_unload_lora(module.net) if lora_layers(module.net) else module.net
    save_motion_adapter(net, out)
    return "AnimateDiffPipeline.from_pretrained(SD_BASE, motion_adapter=MotionAdapter.from_pretrained(DIR))"


def _write_full(module: nn.Module, out: Path) -> str:
    """The family pipeline with the trained denoiser (LoRA merged: plain layer names, which
    diffusers loads instead of initialising anew), saved with `save_pretrained` and checked."""
    family = module.bundle_family
    net = merge_and_unload_lora(module.net) if lora_layers(module.net) else module.net
    try:
        pipeline = family_pipeline(module, net)
    except ValueError as error:
        raise ExportError(str(error)) from None
    pipeline.save_pretrained(str(out))
    model = denoiser_model(net)
    _, info = type(model).from_pretrained(str(out), subfolder=family.denoiser_component, output_loading_info=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise ExportError(
            f"the saved {family.denoiser_component} does not load whole (missing {info['missing_keys'][:3]}, "
            f"unexpected {info['unexpected_keys'][:3]}); nothing was exported"
        )
    return f"{type(pipeline).__name__}.from_pretrained(DIR)"


def export_run(ckpt: str | Path, out: str | Path, format: str = "auto", weights: str = "auto",
               overwrite: bool = False) -> ExportRecord:
    """Export the run checkpoint `ckpt` to the folder `out` (see the module docstring)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"out={out} exists and is not empty; choose a new folder (or overwrite=true)")
    try:
        module, cfg, kind = load_run(ckpt, weights)
    except BundleError as error:
        raise ExportError(str(error)) from None
    family = getattr(module, "bundle_family", None)
    trained = trained_kind(module)
    fmt = choose_format(format, trained, module)
    _check_fits(fmt, trained, module)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lora = None
        with torch.no_grad():
            if fmt == "lora":
                loads_with, lora = _write_lora(module, tmp)
            elif fmt == "comfyui":
                loads_with, lora = _write_comfyui(module, tmp)
            elif fmt == "motion_adapter":
                loads_with = _write_motion_adapter(module, tmp)
            else:
                loads_with = _write_full(module, tmp)
        checkpoint = read_checkpoint(ckpt)
        record = ExportRecord(
            run=str(cfg.get("run_id")), checkpoint=str(ckpt), step=int(checkpoint.get("global_step", -1)),
            format=fmt, weights=kind, family=family.name if family else None,
            pipeline=getattr(module, "bundle_pipeline", None), trained=trained, loads_with=loads_with,
            lora_rank=lora.rank if lora else None, lora_alpha=float(lora.alpha) if lora else None,
        )  # fmt: skip
        (tmp / RECORD_FILE).write_text(json.dumps(asdict(record), indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
