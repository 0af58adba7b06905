"""SimDA adapters (Xing et al. 2023) inserted into a built network without editing it: effvid's
`FactorizedUNet` or a pretrained bundle's diffusers denoiser (`lit_models/peft.py` places them).

- spatial adapters: a bottleneck MLP (ratio 0.25, GELU) after each spatial self-attention and
  one beside (in parallel with) each feed-forward;
- a temporal adapter after each ResBlock: 1x1x1 conv C -> C/2, depthwise (3, 1, 1) conv over
  frames, 1x1x1 conv C/2 -> C, as a residual.

Every adapter's last layer is zero-initialised, so the adapted network starts as exactly the
base network. Adapters are placed by wrapping the base's modules (`stage.resblock`,
`transformer.self_attention`, `transformer.feed_forward`); the base's own weights stay where
they were, under the same names plus `.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.layers import zero_init


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
