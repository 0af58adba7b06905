"""A lean factorized space-time U-Net for videos `(B, C, F, H, W)`.

Spatial layers are 2D and see frames folded into the batch; frames meet only in the temporal
ops placed after the ResBlocks of the chosen levels (VDM's factorization). On a CPU this is
the difference between ~1 s and ~0.2 s per step for the quickstart (see DESIGN.md): 2D convs
over frames, attention only where the feature map is small, temporal mixing as a thin layer.
With `temporal=None` the net is a pure image model applied frame by frame.

Conditioning: the timestep embedding plus the projected pooled text embedding drive a
scale/shift in every ResBlock; per-token text features enter by cross-attention at the
`attention_levels`. Conditioning is per clip, or per frame (`pooled` `(B, F, P)`, `context`
`(B, F, L, D)`) when frames are independent images with captions of their own, marked by
`image_frames` `(B, F)` so the temporal ops leave them alone (VDM's joint training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange, repeat
from torch import Tensor, nn

from lit_models.nets.layers import Downsample, ResBlock, SpatialTransformer, Upsample, group_norm, zero_init


class UNetStage(nn.Module):
    """ResBlock, then a spatial transformer and a temporal op where the level has them."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        attention: bool,
        temporal: Callable[[int], nn.Module] | None,
        heads: int,
        context_dim: int | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.resblock = ResBlock(in_channels, out_channels, embed_dim, dropout)
        self.transformer = SpatialTransformer(out_channels, heads, context_dim) if attention else None
        self.temporal = temporal(out_channels) if temporal is not None else None

    def forward(
        self,
        x: Tensor,
        embedding: Tensor,
        num_frames: int,
        context: Tensor | None,
        context_mask: Tensor | None,
        image_frames: Tensor | None = None,
    ) -> Tensor:
        x = self.resblock(x, embedding)  # (B*F, C, H, W)
        if self.transformer is not None:
            x = self.transformer(x, num_frames, context, context_mask)
        if self.temporal is not None:
            x = self.temporal(x, num_frames, image_frames)
        return x


class FactorizedUNet(nn.Module):
    """Factorized space-time U-Net denoiser.

    Args:
        in_channels, out_channels: video channels in and predicted (out defaults to in).
        channels: width per resolution level; each level after the first halves H and W.
            The default is tuned for the CPU quickstart (~0.25 s/step at 16 x 8 x 16x16 on
            2 threads with `TemporalAttention`; see benchmarks/unet_step.py).
        attention_levels: per level, whether stages get a spatial transformer (self-attention
            over the frame plus cross-attention to `context`); keep to small feature maps.
        temporal_levels: per level, whether stages get a temporal op.
        blocks_per_level: stages per level on the way down (and up, each taking one skip).
        context_dim: width of the text tokens for cross-attention; None disables it.
        pooled_dim: width of the pooled text embedding added to the timestep embedding;
            None disables it.
        heads: attention heads of the spatial transformers.
        temporal: `channels -> nn.Module` building a temporal op (see `temporal.py`); None
            gives an image model applied frame by frame.
        dropout: dropout inside ResBlocks.
        frame_embedding: None (or false), "index" (or true) or "index_and_text": add to the conditioning embedding
            of each video frame an MLP of its index (sinusoids, like the timestep's), or of its
            index and the pooled text together, so every ResBlock knows where in the clip its
            frame sits (and, with the text, where the caption puts the digit at that time: the
            conditional mean of a motion is a function of both). Image frames (and 1-frame
            inputs) get none.
        gradient_checkpointing: recompute each stage's activations in the backward pass
            instead of storing them (less memory, ~30% more compute); training only.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (24, 48, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        temporal_levels: Sequence[bool] = (False, True, True),
        blocks_per_level: int = 1,
        context_dim: int | None = 64,
        pooled_dim: int | None = 64,
        heads: int = 4,
        temporal: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.0,
        frame_embedding: str | bool | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        channels = list(channels)
        if not (len(channels) == len(attention_levels) == len(temporal_levels)):
            raise ValueError(
                f"channels, attention_levels and temporal_levels need one entry per level, got "
                f"{len(channels)}, {len(attention_levels)} and {len(temporal_levels)}"
            )
        out_channels = out_channels or in_channels
        embed_dim = 4 * channels[0]
        self.num_levels = len(channels)
        self.pooled_dim = pooled_dim

        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], embed_dim)
        self.pooled_embedding = (
            nn.Sequential(nn.Linear(pooled_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
            if pooled_dim is not None
            else None
        )
        frame_embedding = {False: None, True: "index"}.get(frame_embedding, frame_embedding)  # type: ignore[call-overload]
        if frame_embedding not in (None, "index", "index_and_text"):
            raise ValueError(f"frame_embedding must be null, 'index' or 'index_and_text', got {frame_embedding!r}")
        if frame_embedding == "index_and_text" and pooled_dim is None:
            raise ValueError("frame_embedding='index_and_text' needs pooled_dim (the pooled text)")
        self.frame_embedding_kind = frame_embedding
        self.frame_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0) if frame_embedding else None
        text_width = pooled_dim if frame_embedding == "index_and_text" else 0
        self.frame_embedding = TimestepEmbedding(channels[0] + text_width, embed_dim) if frame_embedding else None

        def stage(c_in: int, c_out: int, level: int) -> UNetStage:
            return UNetStage(
                c_in,
                c_out,
                embed_dim,
                attention=bool(attention_levels[level]),
                temporal=temporal if temporal_levels[level] else None,
                heads=heads,
                context_dim=context_dim,
                dropout=dropout,
            )

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        self.down_stages = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = []
        c_in = channels[0]
        for level, c in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down_stages.append(stage(c_in, c, level))
                skip_channels.append(c)
                c_in = c
            self.downsamplers.append(Downsample(c) if level < self.num_levels - 1 else nn.Identity())

        self.mid_stage = stage(c_in, c_in, self.num_levels - 1)

        self.up_stages = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            c = channels[level]
            for _ in range(blocks_per_level):
                self.up_stages.append(stage(c_in + skip_channels.pop(), c, level))
                c_in = c
            # The upsampling conv also narrows to the next level's width.
            self.upsamplers.append(Upsample(c, channels[level - 1]) if level > 0 else nn.Identity())
            c_in = channels[level - 1] if level > 0 else c

        self.norm_out = group_norm(c_in)
        self.conv_out = zero_init(nn.Conv2d(c_in, out_channels, 3, padding=1))
        self.blocks_per_level = blocks_per_level

    def _stage(self, stage: UNetStage, *args: Any) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(
        self, timesteps: Tensor, batch_size: int, pooled: Tensor | None, dtype: torch.dtype, num_frames: int = 1
    ) -> Tensor:
        """Conditioning embedding `(B*F, E)` from timesteps and the pooled text embedding
        (`(B, P)` per clip or `(B, F, P)` per frame)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch_size)
        embedding = self.time_embedding(self.time_proj(timesteps).to(dtype))  # (B, E)
        embedding = repeat(embedding, "b e -> (b f) e", f=num_frames)  # (B*F, E)
        if self.pooled_embedding is not None and pooled is not None:
            if pooled.ndim == 2:
                pooled = repeat(pooled, "b p -> (b f) p", f=num_frames)
            embedding = embedding + self.pooled_embedding(rearrange(pooled, "... p -> (...) p").to(dtype))
        return embedding

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        image_frames: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C, F, H, W), timesteps: (B,), context: (B, L, D) or (B, F, L, D), pooled: (B, P)
        # or (B, F, P), context_mask: (B, L) or (B, F, L), image_frames: (B, F) bool
        batch_size, _, num_frames, height, width = x.shape
        factor = 2 ** (self.num_levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"FactorizedUNet: H and W must be divisible by {factor}, got {height}x{width}")
        if context_mask is not None:
            # A row with no real token would make the softmax NaN; let it attend everywhere.
            context_mask = context_mask.bool() | ~context_mask.bool().any(dim=-1, keepdim=True)

        embedding = self.embed(timesteps, batch_size, pooled, x.dtype, num_frames)  # (B*F, E)
        if self.frame_embedding is not None and num_frames > 1:
            frames = repeat(self.frame_proj(torch.arange(num_frames, device=x.device)), "f e -> (b f) e", b=batch_size)
            if self.frame_embedding_kind == "index_and_text":
                if pooled is None:
                    raise ValueError("FactorizedUNet: frame_embedding='index_and_text' needs the pooled text")
                text = pooled if pooled.ndim == 3 else repeat(pooled, "b p -> b f p", f=num_frames)
                frames = torch.cat([frames, rearrange(text, "b f p -> (b f) p").to(frames.dtype)], dim=1)
            frames = self.frame_embedding(frames.to(x.dtype))  # (B*F, E)
            if image_frames is not None:
                frames = frames * rearrange(~image_frames.bool(), "b f -> (b f) 1").to(frames.dtype)
            embedding = embedding + frames.to(embedding.dtype)  # (B*F, E)

        h = self.conv_in(rearrange(x, "b c f h w -> (b f) c h w"))  # (B*F, C0, H, W)
        # oneDNN's convolutions are faster in channels-last layout on CPU (~5% of the step).
        h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for index, stage in enumerate(self.down_stages):
            h = self._stage(stage, h, embedding, num_frames, context, context_mask, image_frames)
            skips.append(h)
            if (index + 1) % self.blocks_per_level == 0:
                h = self.downsamplers[index // self.blocks_per_level](h)

        h = self._stage(self.mid_stage, h, embedding, num_frames, context, context_mask, image_frames)  # (B*F, C_last, H/2^L, W/2^L)

        for index, stage in enumerate(self.up_stages):
            h = self._stage(stage, torch.cat([h, skips.pop()], dim=1), embedding, num_frames, context, context_mask, image_frames)
            if (index + 1) % self.blocks_per_level == 0:
                h = self.upsamplers[index // self.blocks_per_level](h)

        out = self.conv_out(F.silu(self.norm_out(h)))  # (B*F, C_out, H, W)
        return rearrange(out, "(b f) c h w -> b c f h w", f=num_frames)
