"""Training-free sampling modifiers: changes to how a trained denoiser is run while sampling,
beside the samplers and feature caches. A `DiffusionModule` applies the ones its config lists
(`paradigm.sampling_modifiers`) around every sampling run, validation included; each is a
context manager over the module, so the weights and a checkpoint are never touched.

- `ConsistentSelfAttention` (StoryDiffusion, Zhou et al. 2024): each clip's spatial
  self-attention also reads tokens sampled from the other clips of the batch (the same frame),
  so a batch shares one subject's appearance;
- `CrossFrameAttention` (ControlVideo, Zhang et al. 2023): each frame's spatial self-attention
  reads the keys and values of every frame of its clip;
- `InterleavedFrameSmoother` (ControlVideo): at a few steps the predicted clean clip's odd (then
  even) frames are replaced by the average of their neighbours.

The attention modifiers act on effvid's `SpatialTransformer` self-attention (`nets/layers.py`),
wherever it sits (behind control branches, masked-frame wrappers, SimDA adapters). Diffusers
backbones use diffusers' attention processors instead and are refused here, named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from lit_models.nets.layers import Attention, SpatialTransformer


# --- effvid's spatial self-attention, patched for one sampling run ------------------------------


def _spatial_self_attentions(net: nn.Module) -> list[tuple[SpatialTransformer, Attention]]:
    pairs = []
    for block in net.modules():
        if isinstance(block, SpatialTransformer):
            attention = block.self_attention
            attention = attention if isinstance(attention, Attention) else getattr(attention, "base", None)
            if isinstance(attention, Attention):
                pairs.append((block, attention))
    return pairs


def _qkv(attention: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values `(N, heads, S, d)` of an `Attention` for its own input x `(N, S, D)`."""
    q = rearrange(attention.to_q(x), "n s (h d) -> n h s d", h=attention.heads)
    k, v = rearrange(attention.to_kv(x), "n l (two h d) -> two n h l d", two=2, h=attention.heads)
    return q, k, v


@contextlib.contextmanager
def patched_self_attention(net: nn.Module, forward: Any, owner: str) -> Iterator[None]:
    """Inside the block every spatial self-attention of `net` runs `forward(attention, x,
    num_frames)` instead of its own; `num_frames` comes from the enclosing transformer's call."""
    pairs = _spatial_self_attentions(net)
    if not pairs:
        raise ValueError(
            f"{owner}: {type(net).__name__} has no effvid spatial self-attention (a FactorizedUNet with "
            "attention_levels); diffusers backbones are not supported by this modifier"
        )
    hooks = []
    for block, attention in pairs:
        frames = {"value": 1}

        def remember(module: nn.Module, args: tuple, kwargs: dict, frames: dict = frames) -> None:
            frames["value"] = args[1] if len(args) > 1 else kwargs["num_frames"]

        hooks.append(block.register_forward_pre_hook(remember, with_kwargs=True))

        def patched(x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                    attention: Attention = attention, frames: dict = frames) -> Tensor:
            return forward(attention, x, frames["value"])

        attention.forward = patched  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for _, attention in pairs:
            del attention.forward


# --- StoryDiffusion --------------------------------------------------------------------------------


class ConsistentSelfAttention:
    """StoryDiffusion's consistent self-attention: the keys and values of clip b, frame f are its
    own tokens plus a random `rate` of the tokens of frame f of the batch's other clips. With one
    clip (or rate 0) it is plain self-attention. Under classifier-free guidance the batch is
    [unconditional; conditional] and tokens are shared only within each half.

    Left out: StoryDiffusion's semantic motion predictor (transitions between keyframes in an
    image-encoder space) and its sliding window over long stories.

    Args:
        rate: share of the other clips' tokens added to each clip's keys (StoryDiffusion: 0.5).
        seed: seeds the token sampling, so a sampling run is reproducible.
    """

    def __init__(self, rate: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"ConsistentSelfAttention: rate must be in [0, 1], got {rate}")
        self.rate, self.seed = rate, seed

    def attend(self, attention: Attention, x: Tensor, num_frames: int, groups: int, generator: torch.Generator) -> Tensor:
        # x: (B*F, S, D) with the batch made of `groups` equal halves that share nothing
        q, k, v = _qkv(attention, x)  # (B*F, heads, S, d)
        clips = x.shape[0] // num_frames
        if clips % groups:
            raise ValueError(f"ConsistentSelfAttention: {clips} clips do not split into {groups} guidance halves")
        per_group = clips // groups
        layout = "(g b f) h s d -> g b f h s d"
        q, k, v = (rearrange(t, layout, g=groups, f=num_frames) for t in (q, k, v))
        tokens = x.shape[1]
        shared = round(self.rate * (per_group - 1) * tokens)
        outputs = []
        for b in range(per_group):
            keys, values = k[:, b], v[:, b]  # (G, F, heads, S, d)
            if shared > 0:
                others = [i for i in range(per_group) if i != b]
                pool_k = rearrange(k[:, others], "g o f h s d -> g f h (o s) d")
                pool_v = rearrange(v[:, others], "g o f h s d -> g f h (o s) d")
                picked = torch.randperm(pool_k.shape[3], generator=generator)[:shared].to(x.device)
                keys = torch.cat([keys, pool_k[:, :, :, picked]], dim=3)
                values = torch.cat([values, pool_v[:, :, :, picked]], dim=3)
            outputs.append(F.scaled_dot_product_attention(q[:, b], keys, values))  # (G, F, heads, S, d)
        out = rearrange(torch.stack(outputs, dim=1), "g b f h s d -> (g b f) s (h d)")
        return attention.to_out(out)

    @contextlib.contextmanager
    def applied(self, module: nn.Module, guided: bool) -> Iterator[None]:
        generator = torch.Generator().manual_seed(self.seed)
        groups = 2 if guided else 1

        def forward(attention: Attention, x: Tensor, num_frames: int) -> Tensor:
            return self.attend(attention, x, num_frames, groups, generator)

        with patched_self_attention(module.net, forward, type(self).__name__):
            yield


# --- ControlVideo ----------------------------------------------------------------------------------


def cross_frame_attention(attention: Attention, x: Tensor, num_frames: int) -> Tensor:
    """Fully cross-frame self-attention: every frame's queries read the keys and values of all
    frames of its clip, x `(B*F, S, D)` -> `(B*F, S, D)`."""
    q, k, v = _qkv(attention, x)  # (B*F, heads, S, d)
    k, v = (repeat(rearrange(t, "(b f) h s d -> b h (f s) d", f=num_frames), "b h l d -> (b f) h l d", f=num_frames)
            for t in (k, v))  # (B*F, heads, F*S, d)
    out = F.scaled_dot_product_attention(q, k, v)
    return attention.to_out(rearrange(out, "n h s d -> n s (h d)"))


class CrossFrameAttention:
    """ControlVideo's fully cross-frame attention in place of the spatial self-attention, while
    sampling: frames that see each other's keys keep one appearance without temporal layers."""

    @contextlib.contextmanager
    def applied(self, module: nn.Module, guided: bool) -> Iterator[None]:
        with patched_self_attention(module.net, cross_frame_attention, type(self).__name__):
            yield


def smooth_interleaved_frames(x0: Tensor, parity: int) -> Tensor:
    """Frames i with `i % 2 == parity` (not the clip's ends) of x0 `(B, C, F, H, W)` replaced by the
    mean of frames i - 1 and i + 1."""
    out = x0.clone()
    inner = [i for i in range(1, x0.shape[2] - 1) if i % 2 == parity]
    if inner:
        index = torch.tensor(inner, device=x0.device)
        out[:, :, index] = (x0[:, :, index - 1] + x0[:, :, index + 1]) / 2
    return out


class _SmoothedNet(nn.Module):
    """A denoiser whose prediction, at timesteps in `[low, high]`, is that of the smoothed x0."""

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction_type: str, low: int, high: int) -> None:
        super().__init__()
        self.net, self.alphas_cumprod, self.prediction_type = net, alphas_cumprod, prediction_type
        self.low, self.high, self.calls = low, high, 0

    def forward(self, x: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        out = self.net(x, timesteps, **conditioning)
        t = int(timesteps.flatten()[0])
        if not self.low <= t <= self.high:
            return out
        parity, self.calls = (self.calls + 1) % 2, self.calls + 1  # odd frames at one step, even at the next
        abar = self.alphas_cumprod.to(x.device)[timesteps.long()].view(-1, 1, 1, 1, 1).to(out.dtype)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        if self.prediction_type == "epsilon":
            x0 = (x - sigma * out) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * out
        else:  # sample
            x0 = out
        x0 = smooth_interleaved_frames(x0, parity)
        if self.prediction_type == "sample":
            return x0
        eps = (x - alpha * x0) / sigma  # the noise that x0 implies at this x_t
        return eps if self.prediction_type == "epsilon" else alpha * eps - sigma * x0


class InterleavedFrameSmoother:
    """ControlVideo's interleaved-frame smoother: at the sampling steps whose timestep is in
    `timestep_range`, the predicted clean clip's odd frames (then, at the next such step, the
    even ones) become the average of their neighbours, and the step continues from that x0.

    Left out: ControlVideo interpolates with a video frame interpolation network (RIFE); here the
    neighbours are averaged. DDPM-style (epsilon / v / sample) models only.

    Args:
        timestep_range: `[low, high]` training timesteps at which to smooth (ControlVideo smooths
            at 2 of 50 DDIM steps, around the middle of the trajectory).
    """

    def __init__(self, timestep_range: tuple[int, int] = (400, 600)) -> None:
        low, high = (int(t) for t in timestep_range)
        if low > high:
            raise ValueError(f"InterleavedFrameSmoother: timestep_range {timestep_range} is empty")
        self.low, self.high = low, high

    @contextlib.contextmanager
    def applied(self, module: nn.Module, guided: bool) -> Iterator[None]:
        if module.flow_matching:
            raise ValueError("InterleavedFrameSmoother: DDPM-style models only (this one is flow matching)")
        net = module.net
        scheduler = module.noise_scheduler
        module.net = _SmoothedNet(net, scheduler.alphas_cumprod, scheduler.config.prediction_type, self.low, self.high)
        try:
            yield
        finally:
            module.net = net
