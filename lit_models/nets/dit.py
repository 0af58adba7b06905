"""Space-time DiT (Latte, Ma et al. 2024): patch tokens through alternating spatial and
temporal transformer blocks, conditioned by adaLN-Zero on timestep + pooled text and by
cross-attention to the text tokens in the spatial blocks (PixArt-alpha's placement)."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.layers import Attention
from lit_models.nets.tokens import TokenDenoiser, mlp, modulate, unpatchify


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by the
    conditioning embedding; the modulation is zero-initialised, so the block starts as the
    identity (adaLN-Zero). With `context_dim`, a cross-attention to text sits between the two."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim) if context_dim is not None else None
        self.cross_attention = Attention(dim, heads, context_dim) if context_dim is not None else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, embedding: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        # x: (B', L, D), embedding: (B', D), context: (B', L_text, D_text)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(embedding).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attention is not None and context is not None:
            x = x + self.cross_attention(self.cross_norm(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection to patch pixels."""

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, out_features)
        for layer in (self.modulation[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        shift, scale = self.modulation(embedding).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class SpaceTimeDiT(TokenDenoiser):
    """Latte-style DiT denoiser with the `FactorizedUNet` call signature.

    Args:
        in_channels, out_channels: video channels in and predicted (out defaults to in).
        dim, depth, heads: token width, number of (spatial, temporal) block pairs, heads.
        patch_size: square patch side in pixels.
        max_frames, max_size: largest clip the learned positions cover.
        context_dim: text token width for cross-attention; None disables it.
        pooled_dim: pooled text width added to the timestep embedding; None disables it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        dim: int = 96,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 2,
        max_frames: int = 32,
        max_size: int = 64,
        context_dim: int | None = 64,
        pooled_dim: int | None = 64,
    ) -> None:
        super().__init__(in_channels, out_channels, dim, patch_size, max_frames, max_size, pooled_dim)
        self.spatial_blocks = nn.ModuleList(AdaLNBlock(dim, heads, context_dim) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(AdaLNBlock(dim, heads) for _ in range(depth))
        self.final = FinalLayer(dim, patch_size * patch_size * self.out_channels)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C, F, H, W), timesteps: (B,), context: (B, L, D_text), pooled: (B, P), context_mask: (B, L)
        batch_size, _, num_frames, height, width = x.shape
        tokens = self.patch_embed(x)  # (B, F, N, D)
        num_patches = tokens.shape[2]
        embedding = self.condition(timesteps, batch_size, pooled, x.dtype)  # (B, D)
        per_frame = embedding.repeat_interleave(num_frames, dim=0)  # (B*F, D)
        per_patch = embedding.repeat_interleave(num_patches, dim=0)  # (B*N, D)
        frame_context = context.repeat_interleave(num_frames, dim=0) if context is not None else None
        frame_mask = context_mask.repeat_interleave(num_frames, dim=0) if context_mask is not None else None

        h = rearrange(tokens, "b f n d -> (b f) n d")
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, per_frame, frame_context, frame_mask)  # attention within each frame
            h = rearrange(h, "(b f) n d -> (b n) f d", f=num_frames)
            h = temporal(h, per_patch)  # attention across frames at each patch position
            h = rearrange(h, "(b n) f d -> (b f) n d", n=num_patches)
        out = self.final(h, per_frame)  # (B*F, N, p*p*C)
        out = rearrange(out, "(b f) n e -> b (f n) e", f=num_frames)
        return unpatchify(out, self.patch_size, height, width, self.out_channels)
