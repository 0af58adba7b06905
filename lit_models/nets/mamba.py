"""A Mamba backbone over space-time tokens: the video's patch tokens, in raster order over
frames, rows and columns, pass through bidirectional selective scans (one forward, one over
the reversed sequence, as Vision Mamba does), with adaLN-Zero conditioning on timestep + pooled
text and the text tokens prepended to the sequence so the scan carries them to every patch.

The selective scan is `mambapy`'s pure-PyTorch one (parallel scan), so it runs on a CPU;
with `use_cuda_kernels` and the `mamba-ssm` package on a GPU, mambapy switches to its kernels.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.dit import FinalLayer
from lit_models.nets.tokens import TokenDenoiser, modulate, unpatchify


def _mamba_block(dim: int, d_state: int, expand: int, use_cuda_kernels: bool) -> nn.Module:
    from mambapy.mamba import MambaBlock, MambaConfig

    return MambaBlock(MambaConfig(d_model=dim, n_layers=1, d_state=d_state, expand_factor=expand, use_cuda=use_cuda_kernels))


class BidirectionalMambaBlock(nn.Module):
    """x + gate * (scan(h) + flip(scan'(flip(h)))), h the adaLN-modulated norm of x; the
    modulation is zero-initialised, so the block starts as the identity."""

    def __init__(self, dim: int, d_state: int, expand: int, use_cuda_kernels: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.forward_scan = _mamba_block(dim, d_state, expand, use_cuda_kernels)
        self.backward_scan = _mamba_block(dim, d_state, expand, use_cuda_kernels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        # x: (B, L, D), embedding: (B, D)
        shift, scale, gate = self.modulation(embedding).chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        h = self.forward_scan(h) + self.backward_scan(h.flip(1)).flip(1)
        return x + gate[:, None] * h


class SpaceTimeMamba(TokenDenoiser):
    """Mamba denoiser with the `FactorizedUNet` call signature.

    Args:
        in_channels, out_channels: video channels in and predicted (out defaults to in).
        dim, depth: token width and number of bidirectional blocks.
        d_state, expand: SSM state size and inner expansion.
        patch_size, max_frames, max_size: patching and the extent of the learned positions.
        context_dim: text token width (projected and prepended); None: no text tokens.
        pooled_dim: pooled text width added to the timestep embedding; None disables it.
        use_cuda_kernels: use `mamba-ssm`'s selective-scan kernels when installed (GPU).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        dim: int = 96,
        depth: int = 4,
        d_state: int = 16,
        expand: int = 2,
        patch_size: int = 2,
        max_frames: int = 32,
        max_size: int = 64,
        context_dim: int | None = 64,
        pooled_dim: int | None = 64,
        use_cuda_kernels: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, dim, patch_size, max_frames, max_size, pooled_dim)
        self.context_proj = nn.Linear(context_dim, dim) if context_dim is not None else None
        self.blocks = nn.ModuleList(BidirectionalMambaBlock(dim, d_state, expand, use_cuda_kernels) for _ in range(depth))
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
        batch_size, _, _, height, width = x.shape
        h = rearrange(self.patch_embed(x), "b f n d -> b (f n) d")  # (B, F*N, D)
        embedding = self.condition(timesteps, batch_size, pooled, x.dtype)  # (B, D)
        num_text = 0
        if self.context_proj is not None and context is not None:
            text = self.context_proj(context.to(x.dtype))  # (B, L, D)
            if context_mask is not None:  # padding tokens carry nothing into the scan
                text = text * context_mask[..., None].to(text.dtype)
            num_text = text.shape[1]
            h = torch.cat([text, h], dim=1)
        for block in self.blocks:
            h = block(h, embedding)
        out = self.final(h[:, num_text:], embedding)  # (B, F*N, p*p*C)
        return unpatchify(out, self.patch_size, height, width, self.out_channels)
