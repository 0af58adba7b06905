"""Adapters inserted into a built network without editing it (`lit_models/peft.py` places them).

SimDA's (Xing et al. 2023), in effvid's `FactorizedUNet` or a pretrained bundle's diffusers
denoiser:

- spatial adapters: a bottleneck MLP (ratio 0.25, GELU) after each spatial self-attention and
  one beside (in parallel with) each feed-forward;
- a temporal adapter after each ResBlock: 1x1x1 conv C -> C/2, depthwise (3, 1, 1) conv over
  frames, 1x1x1 conv C/2 -> C, as a residual.

Every adapter's last layer is zero-initialised, so the adapted network starts as exactly the
base network. Adapters are placed by wrapping the base's modules (`stage.resblock`,
`transformer.self_attention`, `transformer.feed_forward`); the base's own weights stay where
they were, under the same names plus `.base`.

I2V-Adapter's first-frame attention branch (`FirstFrameAttention`) sits beside each spatial
self-attention of a `FactorizedUNet`, on the same principle.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from lit_models.nets.layers import Attention, zero_init


class BottleneckAdapter(nn.Module):
    """x -> up(GELU(down(x))) over the last dim; zero-initialised `up`."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = zero_init(nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


class TemporalAdapter(nn.Module):
    """SimDA's temporal adapter on frames folded into the batch `(B*F, C, H, W)`, residual."""

    def __init__(self, channels: int, ratio: float = 0.5, kernel_frames: int = 3) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.down = nn.Conv3d(channels, hidden, 1)
        self.temporal = nn.Conv3d(hidden, hidden, (kernel_frames, 1, 1), padding=(kernel_frames // 2, 0, 0), groups=hidden)
        self.act = nn.GELU()
        self.up = zero_init(nn.Conv3d(hidden, channels, 1))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        h = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        h = self.up(self.act(self.temporal(self.down(h))))  # (B, C, F, H, W)
        return x + rearrange(h, "b c f h w -> (b f) c h w")


@dataclass
class FrameCount:
    """Frames per clip of the current forward pass, shared by the temporal adapters (a ResBlock
    is called without it); set by a forward pre-hook on the network."""

    value: int = 1


class AfterAdapter(nn.Module):
    """`base(x) + adapter(base(x))`: an adapter after a layer (SimDA's after-attention place).
    An attention that also returns the text stream (diffusers' CogVideoX blocks) gets the
    adapter on its video output only."""

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.adapter(out[0]), *out[1:])
        return out + self.adapter(out)


class ParallelAdapter(nn.Module):
    """`base(x) + adapter(x)`: an adapter beside a layer (SimDA's feed-forward place)."""

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        return self.base(*args, **kwargs) + self.adapter(x)


class ResBlockWithTemporalAdapter(nn.Module):
    """A ResBlock (frames folded into the batch) followed by a temporal adapter."""

    def __init__(self, base: nn.Module, adapter: TemporalAdapter, frames: FrameCount) -> None:
        super().__init__()
        self.base, self.adapter, self.frames = base, adapter, frames

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        # effvid's ResBlock(x, embedding); diffusers' ResnetBlock2D(input_tensor=..., temb=...)
        return self.adapter(self.base(*args, **kwargs), self.frames.value)


class FirstFrameAttention(nn.Module):
    """I2V-Adapter's branch (Guo et al. 2024) beside a frozen spatial self-attention: every frame's
    tokens also query the first frame's tokens, `base(x) + W'_o attn(W'_q x, W_k x_1, W_v x_1)`.

    The keys and values are the base's own (frozen) projections of frame 1's tokens; a new query
    projection (initialised as the base's) and a zero-initialised output projection train, so
    the adapted network starts as exactly the base. Called like the base, x `(B*F, S, D)`.
    """

    def __init__(self, base: Attention, frames: FrameCount) -> None:
        super().__init__()
        if not isinstance(base, Attention):
            raise TypeError(f"FirstFrameAttention: wraps effvid's Attention, got {type(base).__name__}")
        self.base, self.frames = base, frames
        self.first_frame_query = copy.deepcopy(base.to_q).requires_grad_(True)
        self.first_frame_out = zero_init(nn.Linear(base.to_out.in_features, base.to_out.out_features))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        out = self.base(x, context, mask)
        num_frames, heads = self.frames.value, self.base.heads
        first = rearrange(x, "(b f) s d -> b f s d", f=num_frames)[:, 0]  # (B, S, D): frame 1's tokens
        k, v = rearrange(self.base.to_kv(first), "b s (two h d) -> two b h s d", two=2, h=heads)
        k, v = (repeat(t, "b h s d -> (b f) h s d", f=num_frames) for t in (k, v))
        q = rearrange(self.first_frame_query(x), "n s (h d) -> n h s d", h=heads)
        branch = rearrange(F.scaled_dot_product_attention(q, k, v), "n h s d -> n s (h d)")
        return out + self.first_frame_out(branch)
