"""ControlNet-style control for a built `FactorizedUNet`: a control branch (Control-A-Video,
ControlVideo) and Ctrl-Adapter's adapters from a frozen image ControlNet into a video backbone.

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


def transform_control(control: Tensor, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """MagicStick's edit of a control signal `(B, K, F, H, W)`: each frame's content scaled by
    `scale` about the frame's control centroid and moved by `shift` = (dy, dx) pixels (bilinear,
    zeros outside), so a model following the control draws the subject bigger or elsewhere."""
    batch_size, _, num_frames, height, width = control.shape
    frames = rearrange(control.float(), "b k f h w -> (b f) k h w")
    mass = frames.sum(dim=1)  # (N, H, W)
    ys = torch.arange(height, dtype=frames.dtype, device=frames.device)
    xs = torch.arange(width, dtype=frames.dtype, device=frames.device)
    total = mass.flatten(1).sum(dim=1).clamp_min(1e-6)
    cy = (mass.sum(dim=2) * ys).sum(dim=1) / total  # (N,) centroid row
    cx = (mass.sum(dim=1) * xs).sum(dim=1) / total
    # Output pixel p reads input pixel (p - shift - c) / scale + c.
    src_y = (ys[None, :, None] - shift[0] - cy[:, None, None]) / scale + cy[:, None, None]  # (N, H, 1)
    src_x = (xs[None, None, :] - shift[1] - cx[:, None, None]) / scale + cx[:, None, None]  # (N, 1, W)
    grid = torch.stack(torch.broadcast_tensors(2 * src_x / (width - 1) - 1, 2 * src_y / (height - 1) - 1), dim=-1)
    moved = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return rearrange(moved, "(b f) k h w -> b k f h w", b=batch_size).to(control.dtype)


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


def accept_residuals(base: FactorizedUNet) -> tuple[list[int], int]:
    """Wrap `base`'s up stages and mid stage (in place) so that `run_with_residuals` can add
    residuals to its skips and mid-stage output; returns the skip widths (down-stage order) and
    the mid width."""
    skip_channels = [stage.resblock.conv2.out_channels for stage in base.down_stages]
    # Up stage j takes skip len-1-j (the skips are a stack).
    for j, stage in enumerate(base.up_stages):
        base.up_stages[j] = _SkipResidual(stage, skip_channels[len(skip_channels) - 1 - j])
    base.mid_stage = _OutputResidual(base.mid_stage)
    return skip_channels, base.mid_stage.base.resblock.conv2.out_channels


def run_with_residuals(
    base: FactorizedUNet, skips: list[Tensor], mid: Tensor, x: Tensor, timesteps: Tensor, conditioning: dict[str, Any]
) -> Tensor:
    """`base(x, timesteps, **conditioning)` with `skips` (down-stage order) added to its skip
    connections and `mid` to its mid-stage output (`accept_residuals` prepared it)."""
    ups = list(base.up_stages)
    try:
        for j, stage in enumerate(ups):
            stage.residual = skips[len(skips) - 1 - j]
        base.mid_stage.residual = mid
        return base(x, timesteps, **conditioning)
    finally:
        for stage in ups:
            stage.residual = None
        base.mid_stage.residual = None


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
        skip_channels, mid_channels = accept_residuals(base)
        self.zero_convs = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in skip_channels)
        self.mid_zero_conv = zero_init(nn.Conv2d(mid_channels, mid_channels, 1))
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
        return run_with_residuals(self.base, skips, mid, x, timesteps, conditioning)


class CtrlAdapterBlock(nn.Module):
    """Ctrl-Adapter's adapter for one feature map of the ControlNet: a 1x1 conv to the backbone's
    width, a spatial conv, a temporal conv over frames (residual), and a zero-initialised 1x1
    output conv; frames folded into the batch, `(B*F, C_in, H, W)` -> `(B*F, C_out, H, W)`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from lit_models.nets.temporal import TemporalConv

        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.spatial = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.temporal = TemporalConv(out_channels)
        self.temporal.output_layer.reset_parameters()  # the block's own output is the zero layer
        self.out = zero_init(nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, h: Tensor, num_frames: int) -> Tensor:
        h = F.silu(self.spatial(F.silu(self.proj(h))))
        return self.out(self.temporal(h, num_frames))


class CtrlAdaptedUNet(nn.Module):
    """Ctrl-Adapter (Lin et al. 2024): a frozen image ControlNet (the branch of a `ControlledUNet`
    trained on an image model) feeds a frozen video backbone through trainable adapters with
    temporal layers, one per skip and one for the mid stage; zero-initialised, so the start is
    the backbone. Sparse control: frames whose `control_frames` entry is False get no control
    signal and no ControlNet features; the adapters' temporal convs carry the given frames'
    control to them. In training, without `control_frames`, each frame but the first loses its
    control with probability `sparse_control`.

    The ControlNet runs without text (its text encoder is its own run's, not the backbone's).
    Call as the backbone with `control=(B, K, F, H, W)` and optionally `control_frames=(B, F)`.
    """

    def __init__(self, base: FactorizedUNet, controlnet: ControlledUNet, sparse_control: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, FactorizedUNet) or not isinstance(controlnet, ControlledUNet):
            raise TypeError(f"CtrlAdaptedUNet: needs a FactorizedUNet backbone and a ControlledUNet, got "
                            f"{type(base).__name__} and {type(controlnet).__name__}")
        if len(controlnet.zero_convs) != len(base.down_stages):
            raise ValueError(f"CtrlAdaptedUNet: the ControlNet has {len(controlnet.zero_convs)} skip features, the "
                             f"backbone {len(base.down_stages)} skips (levels x blocks_per_level must match)")
        del controlnet.base  # only the branch runs; the image model it was trained on is not needed
        controlnet.requires_grad_(False)
        self.controlnet, self.sparse_control = controlnet.eval(), sparse_control
        skip_channels, mid_channels = accept_residuals(base)
        self.adapters = nn.ModuleList(
            CtrlAdapterBlock(conv.out_channels, c) for conv, c in zip(controlnet.zero_convs, skip_channels))
        self.mid_adapter = CtrlAdapterBlock(controlnet.mid_zero_conv.out_channels, mid_channels)
        self.base = base

    def train(self, mode: bool = True) -> "CtrlAdaptedUNet":
        super().train(mode)
        self.controlnet.eval()  # frozen: no dropout, whatever the mode
        return self

    def forward(self, x: Tensor, timesteps: Tensor, control: Tensor | None = None,
                control_frames: Tensor | None = None, **conditioning: Any) -> Tensor:
        if control is None:
            return self.base(x, timesteps, **conditioning)
        batch_size, _, num_frames = x.shape[:3]
        if control_frames is None:
            control_frames = torch.ones(batch_size, num_frames, dtype=torch.bool, device=x.device)
            if self.training and self.sparse_control > 0:
                control_frames = torch.rand(batch_size, num_frames, device=x.device) >= self.sparse_control
                control_frames[:, 0] = True
        given = control_frames.to(x.dtype)
        control = control * given[:, None, :, None, None]
        with torch.no_grad():
            skips, mid = self.controlnet.control_residuals(x, timesteps, control, None, None, None)
        per_frame = rearrange(given, "b f -> (b f) 1 1 1")
        skips = [adapter(h * per_frame, num_frames) for adapter, h in zip(self.adapters, skips)]
        mid = self.mid_adapter(mid * per_frame, num_frames)
        return run_with_residuals(self.base, skips, mid, x, timesteps, conditioning)


class XAdaptedUNet(nn.Module):
    """X-Adapter (Ran et al. 2024): an old base runs beside the new (upgraded) base, both frozen,
    and trained mapping layers (1x1 convs, zero-initialised) add each of the old decoder's up-stage
    outputs to the new decoder's up stage of the same place, so plugins made for the old base
    (a LoRA, a control branch inside it) steer the new one. The old base reads its own text
    features (`old_context`, `old_pooled`, `old_context_mask`; `encode_captions` makes them with
    the old run's text encoder).

    Both bases are effvid U-Nets with the same levels and blocks per level (widths may differ).
    """

    def __init__(self, base: FactorizedUNet, old_base: FactorizedUNet, old_text_encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, FactorizedUNet) or not isinstance(old_base, FactorizedUNet):
            raise TypeError(f"XAdaptedUNet: needs two FactorizedUNets, got {type(base).__name__} and {type(old_base).__name__}")
        if len(base.up_stages) != len(old_base.up_stages):
            raise ValueError(f"XAdaptedUNet: the new base has {len(base.up_stages)} up stages, the old one "
                             f"{len(old_base.up_stages)} (levels x blocks_per_level must match)")
        old_base.requires_grad_(False)
        old_text_encoder.requires_grad_(False)
        self.old_base, self.old_text_encoder = old_base, old_text_encoder
        self.mappers = nn.ModuleList(
            zero_init(nn.Conv2d(old.resblock.conv2.out_channels, new.resblock.conv2.out_channels, 1))
            for old, new in zip(old_base.up_stages, base.up_stages))
        for j, stage in enumerate(base.up_stages):
            base.up_stages[j] = _OutputResidual(stage)
        self.base = base

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """The old base's text conditioning, as `old_*` keys beside the new base's."""
        embedding = self.old_text_encoder.encode(list(captions))
        features = {"old_context": embedding.tokens, "old_pooled": embedding.pooled, "old_context_mask": embedding.mask}
        return {name: value for name, value in features.items() if value is not None}

    def forward(self, x: Tensor, timesteps: Tensor, old_context: Tensor | None = None, old_pooled: Tensor | None = None,
                old_context_mask: Tensor | None = None, **conditioning: Any) -> Tensor:
        features: list[Tensor] = []
        hooks = [stage.register_forward_hook(lambda m, a, out: features.append(out)) for stage in self.old_base.up_stages]
        try:
            self.old_base(x, timesteps, context=old_context, pooled=old_pooled, context_mask=old_context_mask)
        finally:
            for hook in hooks:
                hook.remove()
        ups = list(self.base.up_stages)
        try:
            for stage, mapper, feature in zip(ups, self.mappers, features):
                stage.residual = mapper(feature)
            return self.base(x, timesteps, **conditioning)
        finally:
            for stage in ups:
                stage.residual = None
