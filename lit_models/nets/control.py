"""ControlNet-style control branch for a built `FactorizedUNet` (Control-A-Video, ControlVideo).

A trainable copy of the base's encoder (embedding, input conv, down stages, mid stage) reads
the noisy clip plus a per-frame control signal (e.g. Sobel edges) entering through a small
hint encoder whose last conv is zero-initialised; zero-initialised 1x1 convs turn its
features into residuals added to the base's skip connections and mid-stage output, as in
ControlNet. At initialisation every residual is zero, so the controlled net is the base net.

The base is not edited: its up stages are wrapped so that the residual is added to the skip
half of their input, and its mid stage is wrapped to add the mid residual.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from lit_models.nets.layers import zero_init
from lit_models.nets.unet import FactorizedUNet


def sobel_edges(video: Tensor) -> Tensor:
    """Per-frame Sobel gradient magnitude of a clip `(B, C, F, H, W)` in [-1, 1], as a
    one-channel control signal `(B, 1, F, H, W)` in [0, 1] (normalised per frame)."""
    frames = rearrange(video.float().mean(dim=1, keepdim=True), "b c f h w -> (b f) c h w")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=video.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), kernels)  # (B*F, 2, H, W)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    magnitude = magnitude / magnitude.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None, None]
    return rearrange(magnitude, "(b f) c h w -> b c f h w", b=video.shape[0])


class _SkipResidual(nn.Module):
    """An up stage whose skip input (the last `skip_channels` of its input) gets a residual."""

    def __init__(self, base: nn.Module, skip_channels: int) -> None:
        super().__init__()
        self.base, self.skip_channels = base, skip_channels
        self.residual: Tensor | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.residual is not None:  # x: (B*F, C_h + C_skip, H, W)
            x = torch.cat([x[:, : -self.skip_channels], x[:, -self.skip_channels :] + self.residual], dim=1)
        return self.base(x, *args, **kwargs)


class _OutputResidual(nn.Module):
    """A stage whose output gets a residual (ControlNet's mid-block residual)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.residual: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base(*args, **kwargs)
        return out if self.residual is None else out + self.residual


class ControlledUNet(nn.Module):
    """`FactorizedUNet` + trainable control branch; call as the base with `control=(B, K, F, H, W)`.

    Args:
        base: the (frozen) base network; wrapped in place.
        control_channels: channels K of the control signal.
        hint_channels: width of the hint encoder's hidden conv.
    """

    def __init__(self, base: FactorizedUNet, control_channels: int = 1, hint_channels: int = 16) -> None:
        super().__init__()
        if not isinstance(base, FactorizedUNet):
            raise TypeError(f"ControlledUNet: needs a FactorizedUNet base, got {type(base).__name__}")
        encoder = copy.deepcopy(base)
        # The copy keeps only the encoder half.
        encoder.up_stages = encoder.upsamplers = encoder.norm_out = encoder.conv_out = None
        encoder.requires_grad_(True)
        self.encoder = encoder
        width = base.conv_in.out_channels
        self.hint = nn.Sequential(
            nn.Conv2d(control_channels, hint_channels, 3, padding=1),
            nn.SiLU(),
            zero_init(nn.Conv2d(hint_channels, width, 3, padding=1)),
        )
        skip_channels = [stage.resblock.conv2.out_channels for stage in base.down_stages]
        self.zero_convs = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in skip_channels)
        mid_channels = base.mid_stage.resblock.conv2.out_channels
        self.mid_zero_conv = zero_init(nn.Conv2d(mid_channels, mid_channels, 1))

        # Up stage j takes skip len-1-j (the skips are a stack).
        for j, stage in enumerate(base.up_stages):
            base.up_stages[j] = _SkipResidual(stage, skip_channels[len(skip_channels) - 1 - j])
        base.mid_stage = _OutputResidual(base.mid_stage)
        self.base = base

    def control_residuals(
        self, x: Tensor, timesteps: Tensor, control: Tensor, context: Tensor | None,
        pooled: Tensor | None, context_mask: Tensor | None,
    ) -> tuple[list[Tensor], Tensor]:
        """Residuals for the skips (down-stage order) and the mid stage."""
        # x: (B, C, F, H, W), control: (B, K, F, H, W)
        enc = self.encoder
        batch_size, _, num_frames = x.shape[:3]
        if context_mask is not None:
            context_mask = context_mask.bool() | ~context_mask.bool().any(dim=-1, keepdim=True)
        embedding = repeat(enc.embed(timesteps, batch_size, pooled, x.dtype), "b e -> (b f) e", f=num_frames)
        h = enc.conv_in(rearrange(x, "b c f h w -> (b f) c h w"))  # (B*F, C0, H, W)
        h = h + self.hint(rearrange(control.to(x.dtype), "b k f h w -> (b f) k h w"))
        residuals = []
        for index, stage in enumerate(enc.down_stages):
            h = stage(h, embedding, num_frames, context, context_mask)
            residuals.append(self.zero_convs[index](h))
            if (index + 1) % enc.blocks_per_level == 0:
                h = enc.downsamplers[index // enc.blocks_per_level](h)
        h = enc.mid_stage(h, embedding, num_frames, context, context_mask)
        return residuals, self.mid_zero_conv(h)

    def forward(self, x: Tensor, timesteps: Tensor, control: Tensor | None = None, **conditioning: Any) -> Tensor:
        if control is None:
            return self.base(x, timesteps, **conditioning)
        skips, mid = self.control_residuals(
            x, timesteps, control, conditioning.get("context"), conditioning.get("pooled"), conditioning.get("context_mask")
        )
        ups = list(self.base.up_stages)
        try:
            for j, stage in enumerate(ups):
                stage.residual = skips[len(skips) - 1 - j]
            self.base.mid_stage.residual = mid
            return self.base(x, timesteps, **conditioning)
        finally:
            for stage in ups:
                stage.residual = None
            self.base.mid_stage.residual = None
