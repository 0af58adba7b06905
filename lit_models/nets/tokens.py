"""Pieces the token backbones (DiT, U-ViT, Mamba) share: video <-> patch tokens, positions,
the timestep + pooled-text embedding, attention with a key padding mask.

Token layout: `(B, F, N, D)`, N = (H / p) * (W / p) patches per frame, so spatial mixing
folds frames into the batch and temporal mixing folds patches into it.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Video `(B, C, F, H, W)` -> tokens `(B, F, N, D)` plus learned spatial and temporal positions."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_patches: int, max_frames: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.spatial_position = nn.Parameter(torch.zeros(1, 1, max_patches, dim))
        self.temporal_position = nn.Parameter(torch.zeros(1, max_frames, 1, dim))
        nn.init.trunc_normal_(self.spatial_position, std=0.02)
        nn.init.trunc_normal_(self.temporal_position, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        batch_size, _, num_frames, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"PatchEmbed: H and W must be divisible by patch_size={p}, got {height}x{width}")
        num_patches = (height // p) * (width // p)
        if num_patches > self.spatial_position.shape[2] or num_frames > self.temporal_position.shape[1]:
            raise ValueError(
                f"PatchEmbed: {num_frames} frames x {num_patches} patches exceed max_frames="
                f"{self.temporal_position.shape[1]} / max_patches={self.spatial_position.shape[2]}"
            )
        tokens = self.proj(rearrange(x, "b c f h w -> (b f) c h w"))  # (B*F, D, H/p, W/p)
        tokens = rearrange(tokens, "(b f) d h w -> b f (h w) d", b=batch_size)
        return tokens + self.spatial_position[:, :, :num_patches] + self.temporal_position[:, :num_frames]


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int, channels: int) -> Tensor:
    """Per-patch values `(B, F*N, p*p*C)`, frames outermost -> video `(B, C, F, H, W)`."""
    p = patch_size
    return rearrange(
        tokens, "b (f h w) (p q c) -> b c f (h p) (w q)", h=height // p, w=width // p, p=p, q=p, c=channels
    )


class ConditionEmbedding(nn.Module):
    """Timestep embedding plus the projected pooled text embedding, `(B, D)`."""

    def __init__(self, dim: int, pooled_dim: int | None) -> None:
        super().__init__()
        self.time_proj = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(dim, dim)
        self.pooled_embedding = nn.Linear(pooled_dim, dim) if pooled_dim is not None else None

    def forward(self, timesteps: Tensor, batch_size: int, pooled: Tensor | None, dtype: torch.dtype) -> Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch_size)
        embedding = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if self.pooled_embedding is not None and pooled is not None:
            embedding = embedding + self.pooled_embedding(pooled.to(dtype))
        return embedding


def mlp(dim: int, ratio: float = 4.0) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: `x (B, L, D)` normalised elsewhere, shifted and scaled per sample `(B, D)`."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TokenDenoiser(nn.Module):
    """What DiT, U-ViT and Mamba build first: the patch embedding and the timestep + pooled-text
    embedding, under the names their checkpoints hold (`patch_embed.*`, `condition.*`)."""

    def __init__(self, in_channels: int, out_channels: int | None, dim: int, patch_size: int, max_frames: int,
                 max_size: int, pooled_dim: int | None) -> None:  # fmt: skip
        super().__init__()
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size, (max_size // patch_size) ** 2, max_frames)
        self.condition = ConditionEmbedding(dim, pooled_dim)
