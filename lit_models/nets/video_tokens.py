"""Discrete video tokens for the autoregressive paradigm (`lit_models/token_video.py`, CogVideo):
a per-frame VQ tokenizer (diffusers' `VQModel`) and a decoder-only transformer over the tokens
of a clip, frame after frame, behind a text token and a frame-rate token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import VQModel
from einops import rearrange
from torch import Tensor, nn


class FrameVQTokenizer(nn.Module):
    """Clips `(B, C, F, H, W)` in [-1, 1] <-> codes `(B, F, h, w)` in [0, codebook_size), frame by
    frame, through diffusers' `VQModel` (each level after the first halves H and W).

    Args:
        in_channels: video channels.
        block_out_channels: encoder/decoder widths per level.
        latent_channels: width of the quantised vectors.
        codebook_size: number of codes.
        norm_num_groups: GroupNorm groups (must divide every width).
    """

    def __init__(
        self,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 32),
        latent_channels: int = 8,
        codebook_size: int = 64,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        self.vq = VQModel(
            in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
            layers_per_block=1, latent_channels=latent_channels, num_vq_embeddings=codebook_size,
            norm_num_groups=norm_num_groups, mid_block_add_attention=False,
        )  # fmt: skip
        self.codebook_size = codebook_size
        self.downscale = 2 ** (levels - 1)

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction `(B, C, F, H, W)`, codes `(B, F, h, w)`, the VQ loss: codebook + commitment)."""
        frames = rearrange(video, "b c f h w -> (b f) c h w")
        latents = self.vq.encode(frames).latents  # (B*F, D, h, w)
        quantised, vq_loss, (_, _, indices) = self.vq.quantize(latents)
        recon = self.vq.decode(quantised, force_not_quantize=True).sample
        codes = rearrange(indices, "(n h w) -> n h w", h=latents.shape[2], w=latents.shape[3])
        num_frames = video.shape[2]
        return (rearrange(recon, "(b f) c h w -> b c f h w", f=num_frames),
                rearrange(codes, "(b f) h w -> b f h w", f=num_frames), vq_loss)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes `(B, F, h, w)` -> clips `(B, C, F, H, W)`."""
        batch_size, num_frames, height, width = codes.shape
        quant = self.vq.quantize.get_codebook_entry(codes.flatten(), (batch_size * num_frames, height, width, -1))
        frames = self.vq.decode(quant, force_not_quantize=True).sample
        return rearrange(frames, "(b f) c h w -> b c f h w", f=num_frames)


class VideoTokenTransformer(nn.Module):
    """A decoder-only (causal) transformer over a clip's codes, frame-major and row-major inside
    a frame, after two prefix tokens: the pooled text embedding and the frame-rate token.

    Args:
        codebook_size: number of codes (the output classes).
        tokens_per_frame: h * w codes per frame.
        max_frames: longest clip (learned frame positions).
        pooled_dim: width of the pooled text embedding.
        num_frame_rates: number of frame-rate classes.
        dim, depth, heads: transformer width, layers, heads.
    """

    def __init__(
        self,
        codebook_size: int = 64,
        tokens_per_frame: int = 16,
        max_frames: int = 16,
        pooled_dim: int = 64,
        num_frame_rates: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.codebook_size, self.tokens_per_frame, self.max_frames = codebook_size, tokens_per_frame, max_frames
        self.code_embedding = nn.Embedding(codebook_size, dim)
        self.spatial_position = nn.Parameter(torch.zeros(tokens_per_frame, dim))
        self.frame_position = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.trunc_normal_(self.spatial_position, std=0.02)
        nn.init.trunc_normal_(self.frame_position, std=0.02)
        self.text_projection = nn.Linear(pooled_dim, dim)
        self.frame_rate_embedding = nn.Embedding(num_frame_rates, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)

    def forward(self, codes: Tensor, pooled: Tensor, frame_rate: Tensor) -> Tensor:
        """Logits `(B, N, K)` for the next code at each of N positions, given the first N - 1 codes
        of `codes` `(B, N)` (flattened frame-major; N up to a whole clip), the pooled text `(B, P)`
        and the frame-rate class `(B,)`."""
        length = codes.shape[1]
        positions = torch.arange(length, device=codes.device)
        position = self.frame_position[positions // self.tokens_per_frame] + self.spatial_position[positions % self.tokens_per_frame]
        video = (self.code_embedding(codes) + position)[:, :-1]  # (B, N - 1, D): the last code predicts nothing
        prefix = torch.stack([self.text_projection(pooled), self.frame_rate_embedding(frame_rate)], dim=1)  # (B, 2, D)
        sequence = torch.cat([prefix, video], dim=1)  # (B, N + 1, D)
        causal = nn.Transformer.generate_square_subsequent_mask(sequence.shape[1], device=codes.device)
        hidden = self.blocks(sequence, mask=causal, is_causal=True)
        return self.head(self.norm(hidden[:, 1:]))  # (B, N, K): position i + 1 predicts code i

    @torch.no_grad()
    def sample(
        self, pooled: Tensor, frame_rate: Tensor, num_frames: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes `(B, F * tokens_per_frame)`, drawn one at a time (no key/value cache: the clips are short)."""
        if num_frames > self.max_frames:
            raise ValueError(f"VideoTokenTransformer: {num_frames} frames exceed max_frames={self.max_frames}")
        batch_size = pooled.shape[0]
        codes = torch.zeros(batch_size, 1, dtype=torch.long, device=pooled.device)  # a placeholder, never read
        for index in range(num_frames * self.tokens_per_frame):
            logits = self(codes, pooled, frame_rate)[:, index] / max(temperature, 1e-6)  # (B, K)
            if top_k is not None:
                threshold = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            drawn = torch.multinomial(F.softmax(logits.float(), dim=-1).cpu(), 1, generator=generator).to(codes.device)
            codes = torch.cat([codes[:, :index], drawn, codes[:, index:]], dim=1)
        return codes[:, :-1]
