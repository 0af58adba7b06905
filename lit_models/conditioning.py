"""Text conditioning through open_clip's text tower.

Three ways to get a tower, one interface:

- `pretrained="laion2b_s34b_b79k"` (with a `model_name`): open_clip's real loading path,
  for users who have the weights;
- `model_name` alone: that architecture, randomly initialised (no download);
- `text_cfg` + `embed_dim`: a tiny randomly initialised tower trained with the video model,
  what the tests and the CPU quickstart use.

The tokenizer is open_clip's BPE tokenizer, whose vocabulary ships inside the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

# Parts of a `CLIP` model that make up its text tower; their state-dict keys are the same as
# a standalone `TextTransformer`'s.
_CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


@dataclass
class TextEmbedding:
    tokens: Tensor  # (B, L, token_dim) per-token features after the final LayerNorm
    pooled: Tensor  # (B, pooled_dim) open_clip's pooled, projected text feature
    mask: Tensor  # (B, L) bool, True = real token (start, words, end); False = padding


def _named_text_tower(model_name: str, pretrained: str | None) -> TextTransformer:
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"OpenClipTextEncoder: unknown open_clip model_name {model_name!r}")
    tower = _build_text_tower(
        config["embed_dim"], dict(config["text_cfg"], output_tokens=True), quick_gelu=config.get("quick_gelu", False)
    )
    if not isinstance(tower, TextTransformer):
        raise ValueError(f"OpenClipTextEncoder: {model_name!r} has a Hugging Face text tower; only open_clip's own is supported")
    if pretrained is None:
        return tower
    model = open_clip.create_model(model_name, pretrained=pretrained)
    if isinstance(getattr(model, "text", None), TextTransformer):  # CustomTextCLIP keeps its tower whole
        tower.load_state_dict(model.text.state_dict())
    else:  # CLIP spreads the tower's parts over the model
        state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in _CLIP_TEXT_PARTS}
        tower.load_state_dict(state)
    return tower


class OpenClipTextEncoder(nn.Module):
    """Captions -> per-token features, pooled feature and padding mask, via open_clip.

    Args:
        model_name: open_clip architecture, e.g. "ViT-B-32" (also picks the tokenizer).
        pretrained: open_clip pretrained tag; loads the weights (a download unless cached).
        text_cfg: open_clip `CLIPTextCfg` fields for a random-initialised tower, e.g.
            `dict(width=64, layers=2, heads=4, context_length=16, vocab_size=49408)`;
            takes precedence over `model_name`.
        embed_dim: width of the pooled feature for `text_cfg` towers.
        trainable: train the tower with the model; otherwise it is frozen, kept in eval mode
            and run without gradients.
        freeze_token_embedding: when trainable, keep the 49408-row token table fixed. On a
            CPU, AdamW's dense update of that table costs more than the rest of a tiny tower;
            random fixed token vectors stay distinguishable and the layers above learn.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        text_cfg: dict[str, Any] | None = None,
        embed_dim: int | None = None,
        trainable: bool = False,
        freeze_token_embedding: bool = False,
    ) -> None:
        super().__init__()
        if text_cfg is not None:
            if embed_dim is None:
                raise ValueError("OpenClipTextEncoder: text_cfg needs embed_dim (the pooled feature width)")
            if pretrained is not None:
                raise ValueError("OpenClipTextEncoder: give either text_cfg (random tower) or pretrained, not both")
            self.text = _build_text_tower(embed_dim, dict(text_cfg, output_tokens=True))
            self.tokenizer = SimpleTokenizer(context_length=self.text.context_length)
        elif model_name is not None:
            self.text = _named_text_tower(model_name, pretrained)
            self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.text.context_length)
        else:
            raise ValueError("OpenClipTextEncoder: needs model_name or text_cfg")
        vocab_size = getattr(self.tokenizer, "vocab_size", None) or len(self.tokenizer.encoder)
        if self.text.vocab_size < vocab_size:
            raise ValueError(
                f"OpenClipTextEncoder: text tower vocab_size={self.text.vocab_size} is smaller than the "
                f"tokenizer's vocabulary ({vocab_size})"
            )
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()
        elif freeze_token_embedding:
            self.text.token_embedding.requires_grad_(False)

    @property
    def token_dim(self) -> int:
        return self.text.width

    @property
    def pooled_dim(self) -> int:
        return self.text.output_dim if self.text.text_projection is not None else self.text.width

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def train(self, mode: bool = True) -> OpenClipTextEncoder:
        # A frozen encoder stays in eval mode whatever the LightningModule around it does.
        return super().train(mode and self.trainable)

    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids `(B, L)`, padded with the tower's pad id, truncated to its context length."""
        return self.tokenizer(list(captions))

    def forward(self, tokens: Tensor) -> TextEmbedding:
        # tokens: (B, L) int64
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pooled, features = self.text(tokens)  # (B, P), (B, L, D)
        return TextEmbedding(tokens=features, pooled=pooled, mask=tokens != self.text.pad_id)

    def encode(self, captions: list[str]) -> TextEmbedding:
        """Tokenize on the CPU and embed on the module's device."""
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))
