"""Temporal mixing ops for factorized space-time backbones.

Every op has the same contract, so the backbone treats the choice as config (a Hydra partial
`channels -> nn.Module`):

- constructor `Op(channels, ...)`, call `op(x, num_frames)` with x `(B*F, C, H, W)`, frames
  folded into the batch as the spatial layers see them;
- residual with a zero-initialised output projection: inserted into an image model, the
  model starts as that image model;
- `num_frames == 1` returns x unchanged, so one network trains on images and videos.

Normalisation is per frame and position (LayerNorm over channels) so nothing mixes frames
except the op itself; that is what makes the causal variant causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.layers import zero_init


class TemporalAttention(nn.Module):
    """Self-attention over the frames at each spatial position, with a learned relative
    position bias over time (per head, zero at init, so attention starts uniform).

    Args:
        channels: feature width.
        heads: attention heads; must divide `channels`.
        max_frames: longest clip the relative bias covers.
        causal: frame t attends only to frames <= t (MagicVideo's directed attention; also
            what autoregressive extension needs).
    """

    def __init__(self, channels: int, heads: int = 4, max_frames: int = 64, causal: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"TemporalAttention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.max_frames = max_frames
        self.causal = causal
        self.norm = nn.LayerNorm(channels)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.relative_bias = nn.Parameter(torch.zeros(heads, 2 * max_frames - 1))
        self.to_out = zero_init(nn.Linear(channels, channels))

    def attention_bias(self, num_frames: int) -> Tensor:
        """Additive mask `(heads, F, F)`: relative position bias, -inf where causality forbids."""
        positions = torch.arange(num_frames, device=self.relative_bias.device)
        offsets = positions[:, None] - positions[None, :] + self.max_frames - 1  # (F, F), query - key
        bias = self.relative_bias[:, offsets]  # (heads, F, F)
        if self.causal:
            future = positions[None, :] > positions[:, None]  # key after query
            bias = bias.masked_fill(future, float("-inf"))
        return bias

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if num_frames == 1:
            return x
        if num_frames > self.max_frames:
            raise ValueError(f"TemporalAttention: {num_frames} frames exceed max_frames={self.max_frames}")
        height, width = x.shape[-2:]
        h = rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames)
        q, k, v = rearrange(self.to_qkv(self.norm(h)), "n f (three m d) -> three n m f d", three=3, m=self.heads)
        bias = self.attention_bias(num_frames).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B*H*W, heads, F, d)
        out = self.to_out(rearrange(out, "n m f d -> n f (m d)"))  # (B*H*W, F, C)
        return x + rearrange(out, "(b h w) f c -> (b f) c h w", h=height, w=width)


class TemporalConv(nn.Module):
    """Pseudo-3D temporal convolution (Make-A-Video): a 1D conv over frames at each spatial
    position, as a zero-initialised residual, i.e. the identity at init. Frames beyond the
    clip's ends are zero-padded."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"TemporalConv: kernel_size must be odd to keep the frame count, got {kernel_size}")
        self.norm = nn.LayerNorm(channels)
        self.conv = zero_init(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        h = self.norm(rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames))
        out = self.conv(F.silu(rearrange(h, "n f c -> n c f")))  # (B*H*W, C, F)
        return x + rearrange(out, "(b h w) c f -> (b f) c h w", h=height, w=width)
