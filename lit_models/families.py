"""What effvid knows about each pretrained video family: which diffusers pipeline folders it
covers, which component classes it accepts, how its denoiser and VAE are wrapped, how long its
prompts are, and how its LoRAs are saved for `load_lora_weights`.

One entry per family, in the spirit of finetrainers' model specifications. Component classes
are looked up in these allow-lists, never imported by the name a folder's `model_index.json`
gives: a folder is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from lit_models.latent import FrameAutoencoder, VideoAutoencoder
from lit_models.nets.diffusers_video import (
    CogVideoXBackbone,
    DiffusersFrameUNet,
    HunyuanVideoBackbone,
    LatteBackbone,
    LTXVideoBackbone,
    UNet3DBackbone,
    WanBackbone,
)

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel", "LlamaModel")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "LlamaTokenizer",
              "LlamaTokenizerFast", "AutoTokenizer")


@dataclass(frozen=True)
class Family:
    """A pretrained family.

    Args:
        name: effvid's name (experiment configs, messages).
        pipelines: `model_index.json` `_class_name`s it covers.
        denoiser_classes, denoiser_component: accepted model classes of the denoiser, and the
            folder's component holding it.
        wrap_denoiser: wrapper taking the model and the VAE.
        vae_classes: accepted VAE classes; `video_vae` when it compresses time.
        text_length: tokens per caption at the family pipeline's default, from the components.
        lora_pipeline: the pipeline class whose `save_lora_weights` / `load_lora_weights` the
            family's LoRAs use (default: the first of `pipelines`); None when diffusers cannot
            load a LoRA into its denoiser.
        default_fps: what `effvid-sample` and validation use unless told.
        flow_matching: trained with rectified flow (velocity target) rather than DDPM noising.
        motion_modules: AnimateDiff motion modules fit its denoiser.
    """

    name: str
    pipelines: tuple[str, ...]
    denoiser_classes: tuple[str, ...]
    wrap_denoiser: Callable[[nn.Module, Any], nn.Module]
    vae_classes: tuple[str, ...]
    text_length: Callable[[dict[str, Any]], int]
    denoiser_component: str = "transformer"
    video_vae: bool = True
    lora_pipeline: str | None = ""  # "": filled in with pipelines[0]
    default_fps: float = 8.0
    flow_matching: bool = False
    motion_modules: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.lora_pipeline == "":
            object.__setattr__(self, "lora_pipeline", self.pipelines[0])  # frozen: set once, here

    def wrap_vae(self, vae: nn.Module, patch_size: int) -> nn.Module:
        if self.video_vae:
            return VideoAutoencoder(vae, patch_size=patch_size)
        autoencoder = FrameAutoencoder(vae=vae)
        autoencoder.patch_size = patch_size
        return autoencoder


def _tokenizer_length(components: dict[str, Any]) -> int:
    return int(components["tokenizer"].model_max_length)


def spatial_multiple(denoiser: nn.Module) -> int:
    """How many latent pixels one denoiser step down (U-Net levels) or patch covers."""
    model = getattr(denoiser, "model", None) or getattr(denoiser, "unet")
    config = model.config
    if "block_out_channels" in config:  # U-Nets halve the size at every level but the last
        return 2 ** (len(config.block_out_channels) - 1)
    patch = config.get("patch_size") or 1
    return int(patch if isinstance(patch, int) else patch[-1])


def _wrap_ltx(model: nn.Module, vae: Any) -> nn.Module:
    return LTXVideoBackbone(model=model, vae_temporal_compression=vae.temporal_compression_ratio,
                            vae_spatial_compression=vae.spatial_compression_ratio)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="animatediff",
        pipelines=("StableDiffusionPipeline", "AnimateDiffPipeline"),
        denoiser_component="unet",
        denoiser_classes=("UNet2DConditionModel", "UNetMotionModel"),
        wrap_denoiser=lambda unet, vae: DiffusersFrameUNet(unet),
        vae_classes=("AutoencoderKL",),
        video_vae=False,
        text_length=_tokenizer_length,
        lora_pipeline="AnimateDiffPipeline",
        motion_modules=True,
        notes=("an SD 1.x folder; bundle.motion_adapter=PATH adds AnimateDiff's motion modules",),
    ),
    Family(
        name="modelscope",
        pipelines=("TextToVideoSDPipeline",),
        denoiser_component="unet",
        denoiser_classes=("UNet3DConditionModel",),
        wrap_denoiser=lambda model, vae: UNet3DBackbone(model=model),
        vae_classes=("AutoencoderKL",),
        video_vae=False,
        text_length=_tokenizer_length,
        lora_pipeline=None,  # diffusers' UNet3DConditionModel has no LoRA loader (not a PeftAdapterMixin)
    ),
    Family(
        name="cogvideox",
        pipelines=("CogVideoXPipeline",),
        denoiser_classes=("CogVideoXTransformer3DModel",),
        wrap_denoiser=lambda model, vae: CogVideoXBackbone(model=model),
        vae_classes=("AutoencoderKLCogVideoX",),
        text_length=lambda components: int(components["transformer"].config.max_text_seq_length),
    ),
    Family(
        name="ltx_video",
        pipelines=("LTXPipeline",),
        denoiser_classes=("LTXVideoTransformer3DModel",),
        wrap_denoiser=_wrap_ltx,
        vae_classes=("AutoencoderKLLTXVideo",),
        text_length=lambda components: 128,  # LTXPipeline.__call__'s max_sequence_length
        default_fps=25.0,
        flow_matching=True,
    ),
    Family(
        name="wan",
        pipelines=("WanPipeline",),
        denoiser_classes=("WanTransformer3DModel",),
        wrap_denoiser=lambda model, vae: WanBackbone(model=model),
        vae_classes=("AutoencoderKLWan",),
        text_length=lambda components: 512,  # WanPipeline.__call__'s max_sequence_length
        default_fps=16.0,
        flow_matching=True,
    ),
    Family(
        name="hunyuan_video",
        pipelines=("HunyuanVideoPipeline",),
        denoiser_classes=("HunyuanVideoTransformer3DModel",),
        wrap_denoiser=lambda model, vae: HunyuanVideoBackbone(model=model),
        vae_classes=("AutoencoderKLHunyuanVideo",),
        text_length=lambda components: 256,  # HunyuanVideoPipeline.__call__'s max_sequence_length
        default_fps=24.0,
        flow_matching=True,
        notes=("guidance-distilled: the embedded guidance (6.0) is the wrapper's; sample at guidance 1",),
    ),
    Family(
        name="latte",
        pipelines=("LattePipeline",),
        denoiser_classes=("LatteTransformer3DModel",),
        wrap_denoiser=lambda model, vae: LatteBackbone(model=model),
        vae_classes=("AutoencoderKL",),
        video_vae=False,
        text_length=lambda components: 120,  # LattePipeline.encode_prompt's fixed length
        lora_pipeline=None,  # LattePipeline has no load_lora_weights
        notes=("sample with LattePipeline(..., mask_feature=False): effvid trains on the fixed 120-token features",),
    ),
)


def family_for_pipeline(pipeline_class: str, where: str) -> Family:
    for family in FAMILIES:
        if pipeline_class in family.pipelines:
            return family
    supported = sorted(p for f in FAMILIES for p in f.pipelines)
    raise ValueError(f"{where}: pipeline class {pipeline_class!r} is not supported; effvid loads {', '.join(supported)}")

