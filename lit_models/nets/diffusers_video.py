"""diffusers' video denoisers behind effvid's net contract `net(x, timesteps, context=..., pooled=...,
context_mask=...)` with x `(B, C, F, H, W)`, so a pretrained one fine-tunes in effvid's paradigms
like any other backbone, and gives the output its family's pipeline gets for the same inputs.

    CogVideoXBackbone(pretrained="THUDM/CogVideoX-2b", subfolder="transformer")
    UNet3DBackbone(pretrained="ali-vilab/text-to-video-ms-1.7b", subfolder="unet")
    LatteBackbone(config={...})   # random-initialised, from a config dict (effvid's own runs)

Pretrained bundles (`lit_models/bundle.py`) build these from a pipeline folder; each wrapper
calls its model the way the family's diffusers pipeline does (CogVideoX's frame-major layout and
rotary embeddings, LTX-Video's token packing and RoPE scale, the motion U-Net's per-frame text).
The model sits at `.model` (`.unet` for the frame U-Net), the name LoRA export strips.
Feature caching for the transformers is diffusers' own (`enable_cache`, see below).
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


class DiffusersVideoBackbone(nn.Module):
    """Base wrapper: builds `model_class` from a pretrained path/id, a config dict, or takes a model.

    Args:
        pretrained: `from_pretrained` path or hub id (a download unless cached).
        config: model config dict for a random-initialised model (tests, small experiments).
        subfolder: `from_pretrained` subfolder (e.g. "transformer" of a pipeline repo).
        model: an already built model of `model_class` (bundles).
        context_dim: the text token width, filled into `config` under `context_width_key` unless
            the config sets it (`build_net` passes the text encoder's); pooled_dim is unused.
        **from_pretrained: further `from_pretrained` arguments (torch_dtype, revision, ...).
    """

    model_class: type
    pipeline_component = "transformer"  # the pipeline's name for the model (LoRA export prefixes)
    context_width_key: str | None = None  # the model config's text token width

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        subfolder: str | None = None,
        model: nn.Module | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        **from_pretrained: Any,
    ) -> None:
        super().__init__()
        if sum(x is not None for x in (pretrained, config, model)) != 1:
            raise ValueError(f"{type(self).__name__}: give exactly one of pretrained=, config= or model=")
        if model is not None:
            self.model = model
        elif pretrained is not None:
            self.model = self.model_class.from_pretrained(pretrained, subfolder=subfolder, **from_pretrained)
        else:
            width = {self.context_width_key: context_dim} if context_dim is not None and self.context_width_key else {}
            self.model = self.model_class.from_config({**width, **dict(config)})
        self._timestep: float | None = None

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        """Video tokens the model sees for latents of `latent_shape` (dynamic flow shifts use it)."""
        patch = self.model.config.get("patch_size") or 1
        patch = patch if isinstance(patch, int) else patch[-1]
        _, _, frames, height, width = latent_shape
        return frames * (height // patch) * (width // patch)

    # --- diffusers' feature caching -------------------------------------------------
    def enable_cache(self, config: Any) -> None:
        """Enable a diffusers cache (`PyramidAttentionBroadcastConfig`, `FasterCacheConfig`,
        `FirstBlockCacheConfig`, ...) on the model; configs that need the current timestep get
        it from this wrapper. Exact when the config's skip range / threshold skips nothing."""
        if not hasattr(self.model, "enable_cache"):
            raise TypeError(f"{type(self.model).__name__} does not support diffusers' cache hooks")
        if hasattr(config, "current_timestep_callback") and config.current_timestep_callback is None:
            config.current_timestep_callback = lambda: self._timestep
        self.model.enable_cache(config)

    def disable_cache(self) -> None:
        self.model.disable_cache()

    def _cache_context(self, timesteps: Tensor) -> Any:
        if not getattr(self.model, "is_cache_enabled", False):
            return nullcontext()
        timestep = float(timesteps.flatten()[0])
        if self._timestep is not None and timestep > self._timestep:
            self.model._reset_stateful_cache()  # t went up: a new sampling run starts
        self._timestep = timestep
        # The guided conditional and unconditional halves run as one batch, hence one context.
        return self.model.cache_context("cond")

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, pooled: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        # x: (B, C, F, H, W), timesteps: (B,), context: (B, L, D), context_mask: (B, L)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        with self._cache_context(timesteps):
            return self.denoise(x, timesteps, context, context_mask, pooled)

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def _context(context: Tensor | None, x: Tensor, width: int) -> Tensor:
    if context is None:  # an unconditional call: one zero token
        return torch.zeros(x.shape[0], 1, width, dtype=x.dtype, device=x.device)
    return context.to(x.dtype)


def _masked(context: Tensor, mask: Tensor | None) -> Tensor:
    # effvid's own text towers give a mask and pad with real token features; a pipeline's prompt
    # encoder gives no mask where its pipeline uses none, so pretrained models see what they saw.
    return context if mask is None or mask.shape[1] != context.shape[1] else context * mask[..., None].to(context.dtype)


class LatteBackbone(DiffusersVideoBackbone):
    """diffusers' `LatteTransformer3DModel` (Latte: alternating spatial/temporal DiT blocks)."""

    from diffusers import LatteTransformer3DModel as model_class

    context_width_key = "caption_channels"

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        context = _masked(_context(context, x, self.model.config.caption_channels), context_mask)
        # Latte's own encoder_attention_mask is not repeated over frames; its pipeline passes
        # none either, so padding tokens are zeroed instead.
        out = self.model(x, timestep=timesteps, encoder_hidden_states=context, enable_temporal_attentions=x.shape[2] > 1).sample
        return out[:, : x.shape[1]]  # checkpoints with learned variance predict 2C channels


class CogVideoXBackbone(DiffusersVideoBackbone):
    """diffusers' `CogVideoXTransformer3DModel` (full 3D attention over text + video tokens).
    Text is padded or cut to the model's `max_text_seq_length`, as CogVideoX's pipeline does;
    models with rotary position embeddings (CogVideoX-5b, 1.5) get the pipeline's."""

    from diffusers import CogVideoXTransformer3DModel as model_class

    context_width_key = "text_embed_dim"

    def rotary_embedding(self, frames: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        if not self.model.config.use_rotary_positional_embeddings:
            return None
        from diffusers import CogVideoXPipeline

        # The pipeline's own computation, given latent sizes (its pixel sizes / VAE factor).
        shim = SimpleNamespace(vae_scale_factor_spatial=1, transformer=self.model)
        return CogVideoXPipeline._prepare_rotary_positional_embeddings(shim, height, width, frames, device)

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        config = self.model.config
        frames, height, width = x.shape[2:]
        if config.patch_size_t is not None and frames % config.patch_size_t:
            raise ValueError(f"CogVideoX 1.5 patches {config.patch_size_t} latent frames together; got {frames} latent frames")
        context = _masked(_context(context, x, config.text_embed_dim), context_mask)
        length = config.max_text_seq_length
        context = F.pad(context, (0, 0, 0, max(0, length - context.shape[1])))[:, :length]
        out = self.model(
            rearrange(x, "b c f h w -> b f c h w"), encoder_hidden_states=context, timestep=timesteps,
            image_rotary_emb=self.rotary_embedding(frames, height, width, x.device),
        ).sample  # (B, F, C, H, W)
        return rearrange(out, "b f c h w -> b c f h w")


class UNet3DBackbone(DiffusersVideoBackbone):
    """diffusers' `UNet3DConditionModel` (ModelScope text-to-video's pseudo-3D U-Net)."""

    from diffusers import UNet3DConditionModel as model_class

    pipeline_component = "unet"
    context_width_key = "cross_attention_dim"

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        context = _context(context, x, self.model.config.cross_attention_dim)
        return self.model(x, timesteps, encoder_hidden_states=context).sample


class LTXVideoBackbone(DiffusersVideoBackbone):
    """diffusers' `LTXVideoTransformer3DModel`: latents packed into tokens, a token mask on the
    text, RoPE scaled by the VAE's compression and the frame rate, all as `LTXPipeline` does.

    Args:
        vae_temporal_compression, vae_spatial_compression: the folder's VAE ratios (RoPE scale).
        frame_rate: frames per second the clips are given at (LTXPipeline's default: 25).
    """

    from diffusers import LTXVideoTransformer3DModel as model_class

    def __init__(self, *args: Any, vae_temporal_compression: int = 8, vae_spatial_compression: int = 32,
                 frame_rate: float = 25.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vae_temporal_compression, self.vae_spatial_compression = vae_temporal_compression, vae_spatial_compression
        self.frame_rate = frame_rate

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        from diffusers import LTXPipeline

        config = self.model.config
        frames, height, width = x.shape[2:]
        p, p_t = config.patch_size, config.patch_size_t
        context = _context(context, x, config.caption_channels)
        if context_mask is None or context_mask.shape[1] != context.shape[1]:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        out = self.model(
            hidden_states=LTXPipeline._pack_latents(x, p, p_t),  # (B, S, C p_t p p)
            encoder_hidden_states=context,
            timestep=timesteps,
            encoder_attention_mask=context_mask,
            num_frames=frames // p_t,
            height=height // p,
            width=width // p,
            rope_interpolation_scale=(
                self.vae_temporal_compression / self.frame_rate, self.vae_spatial_compression, self.vae_spatial_compression
            ),
        ).sample
        return LTXPipeline._unpack_latents(out, frames // p_t, height // p, width // p, p, p_t)


class WanBackbone(DiffusersVideoBackbone):
    """diffusers' `WanTransformer3DModel` (Wan 2.1 text-to-video)."""

    from diffusers import WanTransformer3DModel as model_class

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        p_t, p_h, p_w = self.model.config.patch_size
        _, _, frames, height, width = latent_shape
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
               pooled: Tensor | None = None) -> Tensor:
        context = _context(context, x, self.model.config.text_dim)
        return self.model(hidden_states=x, timestep=timesteps, encoder_hidden_states=context).sample


class HunyuanVideoBackbone(DiffusersVideoBackbone):
    """diffusers' `HunyuanVideoTransformer3DModel`: Llama token features with their mask, CLIP's pooled
    feature, and (guidance-distilled releases) the embedded guidance scale its pipeline passes.

    Args:
        guidance: the embedded guidance (HunyuanVideoPipeline's `guidance_scale`, default 6.0);
            used when the model has `guidance_embeds`. Sample such a model at guidance 1 (no CFG).
    """

    from diffusers import HunyuanVideoTransformer3DModel as model_class

    def __init__(self, *args: Any, guidance: float = 6.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guidance = guidance

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None,
                pooled: Tensor | None = None) -> Tensor:
        config = self.model.config
        context = _context(context, x, config.text_embed_dim)
        if context_mask is None or context_mask.shape[1] != context.shape[1]:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        if pooled is None:  # an unconditional call
            pooled = torch.zeros(x.shape[0], config.pooled_projection_dim, dtype=x.dtype, device=x.device)
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance * 1000.0, dtype=x.dtype, device=x.device)
        return self.model(hidden_states=x, timestep=timesteps, encoder_hidden_states=context,
                          encoder_attention_mask=context_mask, pooled_projections=pooled.to(x.dtype), guidance=guidance).sample


class DiffusersFrameUNet(nn.Module):
    """A diffusers 2D or motion U-Net behind effvid's net contract with x `(B, C, F, H, W)`.

    `UNet2DConditionModel` sees frames folded into the batch; `UNetMotionModel` (AnimateDiff) takes
    the clip itself but, like the image model, wants the text tokens repeated per frame
    `(B*F, L, D)`, as AnimateDiff's pipeline passes them. The pooled text feature and the padding
    mask are not used: SD-style U-Nets condition on tokens only.
    """

    pipeline_component = "unet"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def is_motion_model(self) -> bool:
        return type(self.unet).__name__ == "UNetMotionModel"

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        return int(torch.tensor(latent_shape[2:]).prod())

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        # x: (B, C, F, H, W), context: (B, L, D)
        num_frames = x.shape[2]
        if context is None:
            raise ValueError("DiffusersFrameUNet: diffusers U-Nets need text tokens (context)")
        tokens = repeat(context, "b l d -> (b f) l d", f=num_frames)  # (B*F, L, D)
        if self.is_motion_model:
            return self.unet(x, timesteps, encoder_hidden_states=tokens, **extra).sample
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        frame_timesteps = repeat(timesteps.expand(x.shape[0]), "b -> (b f)", f=num_frames)
        out = self.unet(frames, frame_timesteps, encoder_hidden_states=tokens, **extra).sample
        return rearrange(out, "(b f) c h w -> b c f h w", f=num_frames)
