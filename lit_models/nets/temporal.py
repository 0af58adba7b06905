"""Temporal mixing ops for factorized space-time backbones.

Every op has the same contract, so the backbone treats the choice as config (a Hydra partial
`channels -> nn.Module`, chosen by `model/temporal=...`):

- constructor `Op(channels, ...)`, call `op(x, num_frames, image_frames=None)` with x
  `(B*F, C, H, W)`, frames folded into the batch as the spatial layers see them, and
  `image_frames` an optional `(B, F)` bool mask, True where a "frame" is an independent image
  (VDM's joint training appends images along the frame axis);
- an image frame's output equals its input and it feeds nothing into the other frames, so one
  network trains on videos, images and both at once;
- `num_frames == 1` returns x unchanged;
- residual with a zero-initialised output layer (`output_layer`), so inserted into an image
  model the model starts as that image model. `TemporalShift` is the exception: it has no
  parameters, so it mixes frames from the first step (Latent-Shift fine-tunes around it).

Normalisation is per frame and position (LayerNorm over channels) so nothing mixes frames
except the op itself; that is what makes the causal variant causal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import SinusoidalPositionalEmbedding, apply_rotary_emb, get_1d_rotary_pos_embed
from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.layers import zero_init


def video_frames_mask(image_frames: Tensor | None, batch_frames: int, num_frames: int, device: torch.device) -> Tensor:
    """`(B, F)` bool, True where a frame belongs to a video (the complement of `image_frames`)."""
    if image_frames is None:
        return torch.ones(batch_frames // num_frames, num_frames, dtype=torch.bool, device=device)
    if image_frames.shape != (batch_frames // num_frames, num_frames):
        raise ValueError(
            f"image_frames has shape {tuple(image_frames.shape)}, expected (B, F) = "
            f"({batch_frames // num_frames}, {num_frames})"
        )
    return ~image_frames.bool().to(device)


def keep_image_frames(x: Tensor, delta: Tensor, video: Tensor) -> Tensor:
    """`x + delta` on video frames, `x` on image frames; x, delta `(B*F, C, H, W)`, video `(B, F)`."""
    return x + delta * rearrange(video, "b f -> (b f) 1 1 1").to(delta.dtype)


def frame_attention_mask(video: Tensor, causal: bool) -> Tensor:
    """Allowed (query, key) frame pairs `(B, F, F)`: video frames see the clip's video frames
    (earlier ones only when causal); every frame sees itself, so no row is empty."""
    num_frames = video.shape[1]
    allowed = video[:, :, None] & video[:, None, :]  # (B, F, F)
    if causal:
        allowed = allowed & torch.ones(num_frames, num_frames, dtype=torch.bool, device=video.device).tril()
    return allowed | torch.eye(num_frames, dtype=torch.bool, device=video.device)


def frame_position_encoding(channels: int, max_frames: int, enabled: bool) -> SinusoidalPositionalEmbedding | None:
    """AnimateDiff's motion-module position encoding: sinusoids of the frame index added to the
    normalised features before an op mixes frames.

    Without it an op sees where a frame sits only relative to the others (a relative bias, a
    conv's zero padding at the clip ends), so at high noise, where every frame's input is
    alike, it cannot place the digit of frame 0 before that of frame 7: the mean of the
    prompted motion is out of reach and samples drift in no particular direction.
    """
    return SinusoidalPositionalEmbedding(channels, max_frames) if enabled else None


def add_frame_positions(h: Tensor, positions: SinusoidalPositionalEmbedding | None) -> Tensor:
    """`h` `(..., F, C)` plus the encoding of frames 0..F-1 (unchanged without one)."""
    if positions is None:
        return h
    return h + positions.pe[0, : h.shape[-2]].to(h.dtype)  # (F, C) broadcast over the leading dims


class TemporalAttention(nn.Module):
    """Self-attention over the frames at each spatial position (VDM), with a learned relative
    position bias over time (per head, zero at init, so attention starts uniform).

    Args:
        channels: feature width.
        heads: attention heads; must divide `channels`.
        max_frames: longest clip the relative bias covers.
        causal: frame t attends only to frames <= t (MagicVideo's directed attention; also
            what autoregressive extension needs).
        frame_positions: add sinusoidal encodings of the absolute frame index to the
            normalised features (AnimateDiff), see `frame_position_encoding`.
    """

    def __init__(
        self, channels: int, heads: int = 4, max_frames: int = 64, causal: bool = False, frame_positions: bool = False
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"TemporalAttention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.max_frames = max_frames
        self.causal = causal
        self.norm = nn.LayerNorm(channels)
        self.positions = frame_position_encoding(channels, max_frames, frame_positions)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.relative_bias = nn.Parameter(torch.zeros(heads, 2 * max_frames - 1))
        self.to_out = zero_init(nn.Linear(channels, channels))

    @property
    def output_layer(self) -> nn.Module:
        return self.to_out

    def attention_bias(self, num_frames: int, video: Tensor | None = None) -> Tensor:
        """Additive mask: relative position bias, -inf where causality or image frames forbid.
        `(heads, F, F)` without `video`, `(B, 1, heads, F, F)` with a `(B, F)` video mask."""
        positions = torch.arange(num_frames, device=self.relative_bias.device)
        offsets = positions[:, None] - positions[None, :] + self.max_frames - 1  # (F, F), query - key
        bias = self.relative_bias[:, offsets]  # (heads, F, F)
        if video is None:
            if self.causal:
                future = positions[None, :] > positions[:, None]  # key after query
                bias = bias.masked_fill(future, float("-inf"))
            return bias
        allowed = frame_attention_mask(video, self.causal)  # (B, F, F)
        return bias.masked_fill(~allowed[:, None, None], float("-inf"))  # (B, 1, heads, F, F)

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        if num_frames > self.max_frames:
            raise ValueError(f"TemporalAttention: {num_frames} frames exceed max_frames={self.max_frames}")
        height, width = x.shape[-2:]
        h = rearrange(x, "(b f) c h w -> b (h w) f c", f=num_frames)
        h = add_frame_positions(self.norm(h), self.positions)
        q, k, v = rearrange(self.to_qkv(h), "b s f (three m d) -> three b s m f d", three=3, m=self.heads)
        video = None if image_frames is None else video_frames_mask(image_frames, x.shape[0], num_frames, x.device)
        bias = self.attention_bias(num_frames, video).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H*W, heads, F, d)
        out = self.to_out(rearrange(out, "b s m f d -> b s f (m d)"))  # (B, H*W, F, C)
        delta = rearrange(out, "b (h w) f c -> (b f) c h w", h=height, w=width)
        return x + delta if video is None else keep_image_frames(x, delta, video)


class TemporalConv(nn.Module):
    """Pseudo-3D temporal convolution (Make-A-Video, ModelScope): a 1D conv over frames at each
    spatial position, as a zero-initialised residual, i.e. the identity at init. Frames beyond
    the clip's ends, and image frames, are seen as zeros. `frame_positions` as in
    `TemporalAttention`."""

    def __init__(self, channels: int, kernel_size: int = 3, max_frames: int = 64, frame_positions: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"TemporalConv: kernel_size must be odd to keep the frame count, got {kernel_size}")
        self.norm = nn.LayerNorm(channels)
        self.positions = frame_position_encoding(channels, max_frames, frame_positions)
        self.conv = zero_init(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2))

    @property
    def output_layer(self) -> nn.Module:
        return self.conv

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        h = F.silu(add_frame_positions(self.norm(rearrange(x, "(b f) c h w -> b h w f c", f=num_frames)), self.positions))
        video = None if image_frames is None else video_frames_mask(image_frames, x.shape[0], num_frames, x.device)
        if video is not None:
            h = h * rearrange(video, "b f -> b 1 1 f 1").to(h.dtype)  # images feed nothing to neighbours
        out = self.conv(rearrange(h, "b h w f c -> (b h w) c f"))  # (B*H*W, C, F)
        delta = rearrange(out, "(b h w) c f -> (b f) c h w", h=height, w=width)
        return x + delta if video is None else keep_image_frames(x, delta, video)


def space_time_rope(num_frames: int, height: int, width: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotary embeddings `(cos, sin)`, each `(F*H*W, head_dim)`, of the (frame, row, column) of
    every position of a clip in `(f h w)` order: diffusers' 1D rotary embedding per axis,
    concatenated over the head dimension (as CogVideoX and HunyuanVideo do). Rows and columns get
    `2 * (head_dim // 6)` dimensions each, frames the rest."""
    spatial = 2 * (head_dim // 6)
    temporal = head_dim - 2 * spatial
    if spatial < 2 or temporal < 2 or temporal % 2:
        raise ValueError(f"space-time rotary embeddings need an even head width of at least 6, got {head_dim}")
    frames, rows, cols = torch.meshgrid(
        torch.arange(num_frames, device=device), torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    parts = [
        get_1d_rotary_pos_embed(dim, positions.flatten().float(), theta=theta, use_real=True)
        for dim, positions in ((temporal, frames), (spatial, rows), (spatial, cols))
    ]
    return torch.cat([cos for cos, _ in parts], dim=-1), torch.cat([sin for _, sin in parts], dim=-1)


class SpaceTimeAttention(nn.Module):
    """Full self-attention over all F*H*W positions of a clip with 3D rotary position
    embeddings (the joint space-time attention of CogVideoX and Latte's variant 1), as a
    zero-initialised residual.

    Factorized temporal ops mix frames at one spatial position only, so a digit that moves
    between frames leaves the position the op can see; here a position attends to every
    position of every frame, and rotary embeddings make the score depend on the space-time
    offset between query and key, so features that the caption shaped can prefer "the previous
    frame, one step to the left". Quadratic in F*H*W: keep it on small feature maps.

    Args:
        channels: feature width.
        heads: attention heads; `channels / heads` must be even and at least 6.
        rope_theta: base of the rotary frequencies; small grids (a few positions per axis)
            want a small base, so that neighbouring offsets differ in angle.
        frame_positions: also add sinusoidal encodings of the absolute frame index, as in
            `TemporalAttention`.
        max_frames: longest clip `frame_positions` covers.
    """

    def __init__(self, channels: int, heads: int = 4, rope_theta: float = 100.0, frame_positions: bool = False, max_frames: int = 64) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SpaceTimeAttention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.rope_theta = rope_theta
        space_time_rope(1, 1, 1, channels // heads, rope_theta, torch.device("cpu"))  # fail at construction on a bad width
        self.norm = nn.LayerNorm(channels)
        self.positions = frame_position_encoding(channels, max_frames, frame_positions)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = zero_init(nn.Linear(channels, channels))

    @property
    def output_layer(self) -> nn.Module:
        return self.to_out

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        h = add_frame_positions(self.norm(rearrange(x, "(b f) c h w -> b (h w) f c", f=num_frames)), self.positions)
        h = rearrange(h, "b (h w) f c -> b (f h w) c", h=height)
        q, k, v = rearrange(self.to_qkv(h), "b n (three m d) -> three b m n d", three=3, m=self.heads)
        rope = space_time_rope(num_frames, height, width, q.shape[-1], self.rope_theta, x.device)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        video = None if image_frames is None else video_frames_mask(image_frames, x.shape[0], num_frames, x.device)
        mask = None
        if video is not None:  # frame-level mask, repeated over the positions of each frame
            allowed = frame_attention_mask(video, causal=False)  # (B, F, F)
            mask = allowed.repeat_interleave(height * width, 1).repeat_interleave(height * width, 2)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, F*H*W, d)
        out = self.to_out(rearrange(out, "b m n d -> b n (m d)"))
        delta = rearrange(out, "b (f h w) c -> (b f) c h w", f=num_frames, h=height)
        return x + delta if video is None else keep_image_frames(x, delta, video)


class TemporalShift(nn.Module):
    """Temporal shift (TSM; Latent-Shift): a `fraction` of the channels moves one frame
    forward in time, as many one frame back; the rest stay. No parameters, no FLOPs beyond a
    copy. Clip ends and image frames contribute zeros to the shifted channels.

    Args:
        channels: feature width (checks the fraction leaves at least one channel to shift).
        fraction: channels shifted each way, as a fraction of `channels` (TSM uses 1/8).
    """

    def __init__(self, channels: int, fraction: float = 0.125) -> None:
        super().__init__()
        self.fold = int(channels * fraction)
        if self.fold < 1 or 2 * self.fold > channels:
            raise ValueError(f"TemporalShift: fraction={fraction} of {channels} channels shifts {self.fold} each way")

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        video = None if image_frames is None else video_frames_mask(image_frames, x.shape[0], num_frames, x.device)
        h = rearrange(x, "(b f) c h w -> b f c h w", f=num_frames)
        source = h if video is None else h * rearrange(video, "b f -> b f 1 1 1").to(h.dtype)
        fold = self.fold
        out = h.clone()
        out[:, 1:, :fold] = source[:, :-1, :fold]  # frame t gets frame t-1's first channels
        out[:, :1, :fold] = 0
        out[:, :-1, fold : 2 * fold] = source[:, 1:, fold : 2 * fold]  # and frame t+1's next ones
        out[:, -1:, fold : 2 * fold] = 0
        out = rearrange(out, "b f c h w -> (b f) c h w")
        return out if video is None else keep_image_frames(x, out - x, video)


class SwappedCrossAttention(nn.Module):
    """VideoFactory's swapped spatial-temporal cross-attention, in a clip-wide 3D window.

    Two branches see the same features: the spatial one as they are (the output of the
    per-frame spatial layers), the temporal one after a temporal self-attention. Each branch
    then queries the other over all space-time positions of the clip, spatial queries reading
    temporal keys/values and temporal queries reading spatial ones, so appearance and motion
    exchange information in both directions. The sum enters as a zero-initialised residual.

    Left out: VideoFactory's shifted 3D windows (the window here is the whole clip, fine at the
    small feature maps where temporal ops sit) and alternating the swap direction per block
    (both directions run in every block instead).

    Args:
        channels: feature width.
        heads: attention heads; must divide `channels`.
        max_frames: longest clip the temporal branch's position bias covers.
    """

    def __init__(self, channels: int, heads: int = 4, max_frames: int = 64) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SwappedCrossAttention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.temporal_branch = TemporalAttention(channels, heads, max_frames)
        # The branch is part of this op's residual, so it must differ from its input at init.
        self.temporal_branch.output_layer.reset_parameters()
        self.norm_spatial = nn.LayerNorm(channels)
        self.norm_temporal = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(channels, 2 * channels, bias=False)
        self.to_out = zero_init(nn.Linear(channels, channels))

    @property
    def output_layer(self) -> nn.Module:
        return self.to_out

    def _cross(self, queries: Tensor, keys_values: Tensor, mask: Tensor | None) -> Tensor:
        # queries, keys_values: (B, F*H*W, C); mask: (B, 1, F*H*W, F*H*W) bool or None
        q = rearrange(self.to_q(queries), "b n (m d) -> b m n d", m=self.heads)
        k, v = rearrange(self.to_kv(keys_values), "b n (two m d) -> two b m n d", two=2, m=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, F*H*W, d)
        return rearrange(out, "b m n d -> b n (m d)")

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        video = None if image_frames is None else video_frames_mask(image_frames, x.shape[0], num_frames, x.device)
        temporal = self.temporal_branch(x, num_frames, image_frames)  # (B*F, C, H, W)
        spatial = self.norm_spatial(rearrange(x, "(b f) c h w -> b (f h w) c", f=num_frames))
        temporal = self.norm_temporal(rearrange(temporal, "(b f) c h w -> b (f h w) c", f=num_frames))
        mask = None
        if video is not None:  # frame-level mask, repeated over the positions of each frame
            allowed = frame_attention_mask(video, causal=False)  # (B, F, F)
            mask = allowed.repeat_interleave(height * width, 1).repeat_interleave(height * width, 2)[:, None]
        out = self.to_out(self._cross(spatial, temporal, mask) + self._cross(temporal, spatial, mask))
        delta = rearrange(out, "b (f h w) c -> (b f) c h w", f=num_frames, h=height, w=width)
        return x + delta if video is None else keep_image_frames(x, delta, video)


class AlphaMixed(nn.Module):
    """Video LDM's alignment layer: `x + alpha * (op(x) - x)`, blending the image model's
    features x with a temporal op's output through a learned scalar alpha.

    alpha starts at 0, so the network starts exactly as the image model whatever the op's
    weights; the wrapped op's zero-initialised output layer is re-initialised, so op and alpha
    both get gradients from the first step (a zero op and a zero alpha would stay at zero).
    diffusers' `AlphaBlender` (SVD U-Net) is the same blend but its learned factor is a
    sigmoid, never exactly the image model, hence this small layer. Image frames keep x
    (like `AlphaBlender`'s `learned_with_images`).

    Args:
        channels: feature width, passed to `op`.
        op: `channels -> nn.Module`, any op of this file.
    """

    def __init__(self, channels: int, op: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.op = op(channels)
        output_layer = getattr(self.op, "output_layer", None)
        if output_layer is not None:
            output_layer.reset_parameters()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, num_frames: int, image_frames: Tensor | None = None) -> Tensor:
        if num_frames == 1:
            return x
        # The op already keeps image frames, so op(x) - x is zero there.
        return x + self.alpha * (self.op(x, num_frames, image_frames) - x)
