"""diffusers' video denoisers behind the `FactorizedUNet` call signature, so a pretrained one
(`from_pretrained`) fine-tunes in effvid's paradigms like any other backbone.

    LatteBackbone(pretrained="maxin-cn/Latte-1", subfolder="transformer")
    CogVideoXBackbone(pretrained="THUDM/CogVideoX-2b", subfolder="transformer")
    UNet3DBackbone(pretrained="ali-vilab/text-to-video-ms-1.7b", subfolder="unet")
    LatteBackbone(config={...})   # random-initialised, from a config dict

The text encoder of the paradigm must produce tokens of the width the model was trained on
(`cross_attention_dim` / `caption_channels` / `text_embed_dim`); pooled text is unused.
Feature caching for the transformers is diffusers' own (`enable_cache`, see below).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DiffusersVideoBackbone(nn.Module):
    """Base wrapper: builds `model_class` from a pretrained path/id or a config dict.

    Args:
        pretrained: `from_pretrained` path or hub id (a download unless cached).
        config: model config dict for a random-initialised model (tests, small experiments).
        subfolder: `from_pretrained` subfolder (e.g. "transformer" of a pipeline repo).
        **from_pretrained: further `from_pretrained` arguments (torch_dtype, revision, ...).
    """

    model_class: type

    def __init__(
        self, pretrained: str | None = None, config: dict[str, Any] | None = None, subfolder: str | None = None, **from_pretrained: Any
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of pretrained= or config=")
        if pretrained is not None:
            self.model = self.model_class.from_pretrained(pretrained, subfolder=subfolder, **from_pretrained)
        else:
            self.model = self.model_class.from_config(dict(config))
        self._timestep: float | None = None

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
            return self.denoise(x, timesteps, context, context_mask)

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        raise NotImplementedError


def _context(context: Tensor | None, x: Tensor, width: int) -> Tensor:
    if context is None:  # an unconditional call: one zero token
        return torch.zeros(x.shape[0], 1, width, dtype=x.dtype, device=x.device)
    return context.to(x.dtype)


def _masked(context: Tensor, mask: Tensor | None) -> Tensor:
    return context if mask is None or mask.shape[1] != context.shape[1] else context * mask[..., None].to(context.dtype)


class LatteBackbone(DiffusersVideoBackbone):
    """diffusers' `LatteTransformer3DModel` (Latte: alternating spatial/temporal DiT blocks)."""

    from diffusers import LatteTransformer3DModel as model_class

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        context = _masked(_context(context, x, self.model.config.caption_channels), context_mask)
        # Latte's own encoder_attention_mask is not repeated over frames; its pipeline passes
        # none either, so padding tokens are zeroed instead.
        out = self.model(x, timestep=timesteps, encoder_hidden_states=context).sample
        return out[:, : x.shape[1]]  # checkpoints with learned variance predict 2C channels


class CogVideoXBackbone(DiffusersVideoBackbone):
    """diffusers' `CogVideoXTransformer3DModel` (full 3D attention over text + video tokens).
    Text is padded or cut to the model's `max_text_seq_length`, as CogVideoX's pipeline does."""

    from diffusers import CogVideoXTransformer3DModel as model_class

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        config = self.model.config
        context = _masked(_context(context, x, config.text_embed_dim), context_mask)
        length = config.max_text_seq_length
        context = F.pad(context, (0, 0, 0, max(0, length - context.shape[1])))[:, :length]
        out = self.model(x.transpose(1, 2), encoder_hidden_states=context, timestep=timesteps).sample  # (B, F, C, H, W)
        return out.transpose(1, 2)


class UNet3DBackbone(DiffusersVideoBackbone):
    """diffusers' `UNet3DConditionModel` (ModelScope text-to-video's pseudo-3D U-Net)."""

    from diffusers import UNet3DConditionModel as model_class

    def denoise(self, x: Tensor, timesteps: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        context = _context(context, x, self.model.config.cross_attention_dim)
        return self.model(x, timesteps, encoder_hidden_states=context).sample
