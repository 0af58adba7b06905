"""Spatial building blocks shared by the backbones: ResBlock, spatial transformer, resampling.

Every block here sees frames folded into the batch, `(B*F, C, H, W)`; what happens across
frames lives in `temporal.py`.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    # Few groups: the nets here are narrow (32..128 channels), where 32 groups of 1-4 channels
    # would be an instance norm.
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch ending in it starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning embedding as a scale/shift of the
    second norm (FiLM, as in ADM): strong conditioning at the cost of one small matmul."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        # x: (N, C_in, H, W), embedding: (N, E) with N = B*F
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        scale, shift = rearrange(self.embed_proj(F.silu(embedding)), "n c -> n c 1 1").chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`; self-attention when
    `context` is None, cross-attention to `context` otherwise."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        # x: (N, S, D), context: (N, L, D_ctx), mask: (N, L) bool, True = attend
        q = rearrange(self.to_q(x), "n s (h d) -> n h s d", h=self.heads)
        k, v = rearrange(self.to_kv(x if context is None else context), "n l (two h d) -> two n h l d", two=2, h=self.heads)
        attn_mask = None
        if mask is not None:  # a row with no real key attends everywhere, so the softmax stays finite
            mask = mask.bool() | ~mask.bool().any(dim=-1, keepdim=True)
            attn_mask = rearrange(mask, "n l -> n 1 1 l")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, S, d)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


class SpatialTransformer(nn.Module):
    """Per-frame transformer block: self-attention over the H*W positions of a frame,
    cross-attention to the text tokens, feed-forward; zero-initialised output projection."""

    def __init__(self, channels: int, heads: int, context_dim: int | None, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attention = Attention(channels, heads)
        self.cross_attention = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross_attention = Attention(channels, heads, context_dim)
        self.norm_ff = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, ff_mult * channels), nn.GELU(), nn.Linear(ff_mult * channels, channels)
        )
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(
        self, x: Tensor, num_frames: int, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        # x: (B*F, C, H, W), context: (B, L, D_ctx) or (B, F, L, D_ctx), context_mask: (B, L) or (B, F, L)
        height, width = x.shape[-2:]
        h = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))  # (B*F, HW, C)
        h = h + self.self_attention(self.norm_self(h))
        if self.cross_attention is not None and context is not None and context.ndim == 4:
            # Per-frame context (B, F, L, D): independent images, each with its own caption.
            frame_mask = None if context_mask is None else rearrange(context_mask, "b f l -> (b f) l")
            h = h + self.cross_attention(self.norm_cross(h), rearrange(context, "b f l d -> (b f) l d"), frame_mask)
        elif self.cross_attention is not None and context is not None:
            # Cross-attention treats every query independently, so the frames of a clip can
            # share one key/value set: (B, F*HW, C) queries instead of F copies of the context.
            h = rearrange(h, "(b f) s c -> b (f s) c", f=num_frames)
            h = h + self.cross_attention(self.norm_cross(h), context, context_mask)
            h = rearrange(h, "b (f s) c -> (b f) s c", f=num_frames)
        h = h + self.feed_forward(self.norm_ff(h))
        h = self.proj_out(h)
        return x + rearrange(h, "n (h w) c -> n c h w", h=height, w=width)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Conv at the low resolution, then nearest 2x upsampling.

    Convolving before upsampling costs a quarter of the usual upsample-then-conv; the
    ResBlock that follows smooths the nearest-neighbour blocks. On the quickstart this
    is ~15% of the step time.
    """

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")  # (N, C_out, 2H, 2W)
