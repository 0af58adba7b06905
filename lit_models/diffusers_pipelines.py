"""A run on a pretrained bundle as its family's own diffusers pipeline: for `effvid-sample
backend=diffusers` (the family's sampler and decoding, to compare with effvid's) and for the
`full` export (`save_pretrained` of the same object).

The pipeline is built from the run's components: the trained denoiser (with its LoRA layers, or
merged), the bundle's VAE, text encoder and tokenizer, and the folder's scheduler.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn


def denoiser_model(net: nn.Module) -> nn.Module:
    """The diffusers model inside effvid's wrapper (`.model`, or `.unet` for the frame U-Net)."""
    for attribute in ("model", "unet"):
        model = getattr(net, attribute, None)
        if model is not None and hasattr(model, "config"):
            return model
    raise ValueError(f"{type(net).__name__} is effvid's own network, not a diffusers model: it has no pipeline")


def family_pipeline(module: nn.Module, net: nn.Module | None = None) -> Any:
    """The family pipeline of a bundle-built paradigm `module` (`net` replaces its denoiser)."""
    import diffusers

    family = getattr(module, "bundle_family", None)
    if family is None:
        raise ValueError("this run's model is effvid's own network, which has no diffusers pipeline")
    model = denoiser_model(net if net is not None else module.net)
    pipeline_name = module.bundle_pipeline
    if type(model).__name__ == "UNetMotionModel":
        pipeline_name = "AnimateDiffPipeline"
    elif pipeline_name in ("StableDiffusionPipeline", "AnimateDiffPipeline"):
        pipeline_name = "StableDiffusionPipeline"  # an image U-Net without motion modules
    pipeline_class = getattr(diffusers, pipeline_name)
    scheduler_config = dict(module.noise_scheduler.config).get("effvid_pipeline_scheduler")
    if scheduler_config is None:
        raise ValueError("the run's noise schedule does not record its pipeline's scheduler")
    components: dict[str, Any] = {
        family.denoiser_component: model, "vae": module.autoencoder.vae, **module.text_encoder.pipeline_components(),
        "scheduler": getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
    }  # fmt: skip
    parameters = inspect.signature(pipeline_class.__init__).parameters
    for name, parameter in parameters.items():
        if name not in components and name != "self" and parameter.default is inspect.Parameter.empty:
            components[name] = None  # safety_checker, feature_extractor, motion_adapter, ...
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    pipeline = pipeline_class(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _call_arguments(pipeline: Any, module: nn.Module, frames: int) -> dict[str, Any]:
    """What each family's `__call__` needs besides the prompt to match effvid's training inputs."""
    name = type(pipeline).__name__
    text_length = module.text_encoder.max_length
    if name == "StableDiffusionPipeline":
        raise ValueError("an image U-Net without motion modules has no video pipeline; add bundle.motion_adapter=")
    if name == "LattePipeline":
        return {"video_length": frames, "mask_feature": False, "clean_caption": False}
    arguments: dict[str, Any] = {"num_frames": frames}
    if name in ("CogVideoXPipeline", "LTXPipeline", "WanPipeline", "HunyuanVideoPipeline"):
        arguments["max_sequence_length"] = text_length
    if name == "HunyuanVideoPipeline":  # its guidance_scale is the embedded guidance, not CFG
        arguments["guidance_scale"] = module.net.guidance
    if name == "LTXPipeline":
        arguments["frame_rate"] = module.net.frame_rate
    return arguments


@torch.no_grad()
def pipeline_generate(
    module: nn.Module, prompts: Sequence[str], steps: int, guidance_scale: float, seed: int, num_frames: int | None = None
) -> Tensor:
    """Videos `(B, C, F, H, W)` in [-1, 1] from the family pipeline, one seeded generator per call."""
    pipeline = family_pipeline(module)
    _, frames, height, width = (int(v) for v in module.video_shape)
    arguments = {"guidance_scale": guidance_scale, **_call_arguments(pipeline, module, num_frames or frames)}
    output = pipeline(
        list(prompts), height=height, width=width, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="pt", **arguments,
    ).frames  # (B, F, C, H, W) in [0, 1]
    return (torch.as_tensor(output).permute(0, 2, 1, 3, 4).float() * 2 - 1).clamp(-1, 1)
