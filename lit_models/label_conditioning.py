"""A control for text conditioning on the moving digits: learned (digit, direction) label
embeddings behind the text encoder's interface.

A run with this encoder in place of the text tower tells whether a model's failure to follow
the caption's direction lies in the text path (the tower does not separate the directions)
or in the denoiser's temporal path (it cannot produce the motion even when told exactly).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_models.conditioning import TextEmbedding
from lit_models.metrics import DIRECTIONS, parse_digit_caption


class DigitLabelEncoder(nn.Module):
    """Moving-digit captions -> two tokens (a digit and a direction embedding) and their sum
    as the pooled feature; any other caption (the empty one of guidance dropout) gets a
    learned "no label" embedding for each, so classifier-free guidance works as with text.

    Args:
        width: token width (`model.context_dim`).
        embed_dim: pooled width (`model.pooled_dim`).
    """

    def __init__(self, width: int = 64, embed_dim: int = 64) -> None:
        super().__init__()
        self.directions = list(DIRECTIONS)
        self.digit_tokens = nn.Embedding(11, width)  # index 10: no label
        self.direction_tokens = nn.Embedding(len(self.directions) + 1, width)
        self.to_pooled = nn.Linear(width, embed_dim)
        self.trainable = True

    @property
    def token_dim(self) -> int:
        return self.digit_tokens.embedding_dim

    @property
    def pooled_dim(self) -> int:
        return self.to_pooled.out_features

    def labels(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Digit `(B,)` and direction `(B,)` indices; the "no label" index where unparsed."""
        parsed = [parse_digit_caption(c) for c in captions]
        digits = [p[0] if p else 10 for p in parsed]
        directions = [self.directions.index(p[1]) if p else len(self.directions) for p in parsed]
        return torch.tensor(digits), torch.tensor(directions)

    def encode(self, captions: list[str]) -> TextEmbedding:
        device = self.digit_tokens.weight.device
        digits, directions = (t.to(device) for t in self.labels(list(captions)))
        tokens = torch.stack([self.digit_tokens(digits), self.direction_tokens(directions)], dim=1)  # (B, 2, D)
        pooled = self.to_pooled(tokens.sum(dim=1))  # (B, P)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=torch.ones(tokens.shape[:2], dtype=torch.bool, device=device))
