"""U-ViT (Bao et al. 2023): a ViT over all space-time patch tokens in which the timestep and
the text are tokens too, with long skip connections from each early block to its mirror."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.layers import Attention
from lit_models.nets.tokens import TokenDenoiser, mlp, unpatchify


class Block(nn.Module):
    """Pre-norm transformer block; with `skip`, a long skip is concatenated and projected first."""

    def __init__(self, dim: int, heads: int, skip: bool = False) -> None:
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim)

    def forward(self, x: Tensor, key_mask: Tensor | None, skip: Tensor | None = None) -> Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        x = x + self.attention(self.norm1(x), mask=key_mask)
        return x + self.mlp(self.norm2(x))


class UViT(TokenDenoiser):
    """U-ViT denoiser with the `FactorizedUNet` call signature.

    Sequence: [timestep(+pooled) token, text tokens, video patch tokens (F * N)], full
    space-time attention (fine for the small token counts it is meant for; use `SpaceTimeDiT`
    for long clips).

    Args:
        in_channels, out_channels: video channels in and predicted (out defaults to in).
        dim, depth, heads: token width, blocks (odd: in-blocks, a mid block, out-blocks), heads.
        patch_size, max_frames, max_size: patching and the extent of the learned positions.
        context_dim: text token width (projected to `dim`); None: no text tokens.
        pooled_dim: pooled text width added to the timestep token; None disables it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        dim: int = 96,
        depth: int = 7,
        heads: int = 4,
        patch_size: int = 2,
        max_frames: int = 32,
        max_size: int = 64,
        context_dim: int | None = 64,
        pooled_dim: int | None = 64,
    ) -> None:
        if depth % 2 == 0:
            raise ValueError(f"UViT: depth must be odd (in-blocks, mid block, out-blocks), got {depth}")
        super().__init__(in_channels, out_channels, dim, patch_size, max_frames, max_size, pooled_dim)
        self.context_proj = nn.Linear(context_dim, dim) if context_dim is not None else None
        half = depth // 2
        self.in_blocks = nn.ModuleList(Block(dim, heads) for _ in range(half))
        self.mid_block = Block(dim, heads)
        self.out_blocks = nn.ModuleList(Block(dim, heads, skip=True) for _ in range(half))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C, F, H, W), timesteps: (B,), context: (B, L, D_text), pooled: (B, P), context_mask: (B, L)
        batch_size, _, _, height, width = x.shape
        video = rearrange(self.patch_embed(x), "b f n d -> b (f n) d")  # (B, F*N, D)
        prefix = [self.condition(timesteps, batch_size, pooled, x.dtype)[:, None]]  # (B, 1, D)
        mask = [torch.ones(batch_size, 1, dtype=torch.bool, device=x.device)]
        if self.context_proj is not None and context is not None:
            prefix.append(self.context_proj(context.to(x.dtype)))  # (B, L, D)
            mask.append(context_mask.bool() if context_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool, device=x.device))
        num_prefix = sum(p.shape[1] for p in prefix)
        h = torch.cat([*prefix, video], dim=1)  # (B, 1 + L + F*N, D)
        key_mask = torch.cat([*mask, torch.ones(video.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
        key_mask = key_mask if context_mask is not None else None  # (B, 1 + L + F*N)

        skips = []
        for block in self.in_blocks:
            h = block(h, key_mask)
            skips.append(h)
        h = self.mid_block(h, key_mask)
        for block in self.out_blocks:
            h = block(h, key_mask, skips.pop())
        out = self.proj_out(self.norm_out(h[:, num_prefix:]))  # (B, F*N, p*p*C)
        return unpatchify(out, self.patch_size, height, width, self.out_channels)
